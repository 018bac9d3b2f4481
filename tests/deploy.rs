//! The deploy/ artifacts, checked by the tools that consume them: promtool
//! (alert rules, their unit tests, the scrape config), systemd-analyze (the
//! unit), kubernetes-validate (the manifests, against the real API schemas)
//! and `nodescope check-config` (every shipped config). Then the agent is run
//! the way the artifacts run it: with only the unit's capabilities under
//! strace (every syscall it makes must pass the unit's filter) and the
//! unit's watchdog, with the DaemonSet's command line from a private cgroup
//! namespace, and scraped by a real Prometheus that loads alerts.yml and
//! evaluates every dashboard query against the live metrics.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_nodescope");
/// Where the shipped unit and manifest expect the binary and config.
const SHIPPED_BIN: &str = "/usr/local/bin/nodescope";
const SHIPPED_CONFIG: &str = "/etc/nodescope/nodescope.toml";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn deploy(rel: &str) -> PathBuf {
    repo().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Output {
    fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{shown}: {e}"));
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

// ---------------------------------------------------------------- promtool

#[test]
fn alert_rules_pass_promtool_check() {
    require_tool("promtool", "prometheus");
    let out = run(Command::new("promtool").args(["check", "rules"]).arg(deploy("prometheus/alerts.yml")));
    assert!(out.ok, "promtool check rules: {}", out.text());
    let rules = alert_rules();
    eprintln!("{}", out.stdout.trim());
    assert!(out.stdout.contains(&format!("SUCCESS: {} rules found", rules.len())), "{}", out.text());
}

#[test]
fn alert_unit_tests_pass() {
    require_tool("promtool", "prometheus");
    let out = run(Command::new("promtool").args(["test", "rules"]).arg(deploy("prometheus/alerts_test.yml")));
    assert!(out.ok && out.stdout.contains("SUCCESS"), "promtool test rules: {}", out.text());

    // Every alert has a case where it fires and one where it does not.
    let tests = yaml_docs(&deploy("prometheus/alerts_test.yml"));
    let mut firing = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for group in tests[0]["tests"].as_array().unwrap() {
        for case in group["alert_rule_test"].as_array().unwrap() {
            let name = case["alertname"].as_str().unwrap().to_string();
            let expected = case["exp_alerts"].as_array().map(|a| a.len()).unwrap_or(0);
            if expected > 0 {
                firing.insert(name)
            } else {
                silent.insert(name)
            };
        }
    }
    for name in alert_rules() {
        assert!(firing.contains(&name), "alerts_test.yml has no case where {name} fires");
        assert!(silent.contains(&name), "alerts_test.yml has no case where {name} stays silent");
    }
}

#[test]
fn prometheus_config_passes_promtool_check() {
    require_tool("promtool", "prometheus");
    let out = run(Command::new("promtool").args(["check", "config"]).arg(deploy("prometheus/prometheus.yml")));
    assert!(out.ok, "promtool check config: {}", out.text());
    // the rule file it names is the one shipped beside it, and was checked too
    let rules = alert_rules().len();
    assert!(out.text().contains(&format!("SUCCESS: {rules} rules found")), "{}", out.text());
}

/// The name of every alert in alerts.yml.
fn alert_rules() -> Vec<String> {
    let docs = yaml_docs(&deploy("prometheus/alerts.yml"));
    let groups = docs[0]["groups"].as_array().unwrap();
    groups
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .map(|r| r["alert"].as_str().unwrap().to_string())
        .collect()
}

/// The agent's rule ids, from its catalog (agent/src/health/rules.rs).
fn agent_rule_ids() -> Vec<String> {
    let src = read(&repo().join("agent/src/health/rules.rs"));
    let start = src.find("pub const RULES: &[RuleDef] = &[").expect("the RULES catalog in agent/src/health/rules.rs");
    let end = start + src[start..].find("\n];").unwrap();
    src[start..end]
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rule(\""))
        .map(|r| r.split('"').next().unwrap().to_string())
        .collect()
}

/// The alert that follows a rule: "no_peers" -> "NodescopeNoPeers".
fn verdict_alert_name(rule: &str) -> String {
    let camel: String = rule
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
        })
        .collect();
    format!("Nodescope{camel}")
}

/// Series the agent's rules judge: an alert computed from them here would
/// hold a second copy of a threshold that `[rules]` sets.
const RULE_INPUTS: &[&str] = &[
    "nodescope_filesystem_available_bytes",
    "nodescope_filesystem_free_bytes",
    "nodescope_filesystem_size_bytes",
    "nodescope_filesystem_growth_bytes_per_second",
    "nodescope_datadir_days_until_full",
    "nodescope_cgroup_memory_usage_bytes",
    "nodescope_cgroup_memory_working_set_bytes",
    "nodescope_cgroup_memory_limit_bytes",
    "nodescope_process_open_fds",
    "nodescope_process_fd_limit",
    "nodescope_file_sync_duration_seconds",
    "nodescope_connection_open",
    "nodescope_connection_opened_total",
    "nodescope_connection_closed_total",
    "nodescope_connection_failed_total",
    "nodescope_chain_tip_age_seconds",
    "nodescope_peer_netgroups",
];

/// One config tunes the agent and the alerts: every rule of the agent has
/// exactly one alert, which fires on its verdict with its severity and no
/// `for` of its own, and no alert recomputes a rule from its inputs. Every
/// alert is named Nodescope..., and NodescopeDown depends on no job name.
#[test]
fn alerts_follow_the_agents_rules() {
    let ids = agent_rule_ids();
    assert!(ids.len() >= 17 && ids.iter().any(|i| i == "no_peers"), "rule ids read from rules.rs: {ids:?}");
    let docs = yaml_docs(&deploy("prometheus/alerts.yml"));
    let rules: Vec<&Value> =
        docs[0]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
    let mut problems = Vec::new();
    for r in &rules {
        let name = r["alert"].as_str().unwrap();
        if !name.starts_with("Nodescope") {
            problems.push(format!("{name}: not named Nodescope..., it may collide with another exporter's alert"));
        }
        let expr = r["expr"].as_str().unwrap();
        let (metrics, _) = promql_names(expr);
        for m in metrics.iter().filter(|m| RULE_INPUTS.contains(&family(m))) {
            problems
                .push(format!("{name}: computes from {m}, which an agent rule judges: use its nodescope_rule_state"));
        }
    }
    for id in &ids {
        let expr = format!("nodescope_rule_state{{nodescope_rule=\"{id}\"}} == 2");
        let found: Vec<&&Value> = rules.iter().filter(|r| r["expr"].as_str().unwrap().trim() == expr).collect();
        if found.len() != 1 {
            problems.push(format!("rule {id}: {} alerts on `{expr}`, not one", found.len()));
            continue;
        }
        let r = found[0];
        if r["alert"] != verdict_alert_name(id).as_str() {
            problems.push(format!("rule {id}: alert {} is not named {}", r["alert"], verdict_alert_name(id)));
        }
        if r["labels"]["severity"] != "{{ $labels.nodescope_rule_severity }}" {
            problems.push(format!("rule {id}: severity {} is not the rule's own", r["labels"]["severity"]));
        }
        if !r["for"].is_null() {
            problems.push(format!(
                "rule {id}: `for` {} delays a verdict that cannot flap; the rule's `for` is the agent's",
                r["for"]
            ));
        }
    }
    let down: Vec<&&Value> = rules.iter().filter(|r| r["alert"] == "NodescopeDown").collect();
    assert_eq!(down.len(), 1, "one NodescopeDown rule");
    let expr = down[0]["expr"].as_str().unwrap();
    assert!(!expr.contains("job=") && expr.contains("absent(nodescope_build_info)"), "NodescopeDown: {expr}");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    eprintln!("{} agent rules, each with its verdict alert; {} alerts in all", ids.len(), rules.len());
}

// ---------------------------------------------------------------- systemd

fn shipped_unit() -> String {
    read(&deploy("systemd/nodescope.service"))
}

/// `Key=` values of the unit (later lines win, as systemd reads them).
fn unit_value(unit: &str, key: &str) -> Option<String> {
    unit.lines().rev().find_map(|l| l.strip_prefix(&format!("{key}="))).map(|v| v.trim().to_string())
}

/// The unit with the binary swapped for the one under test, in a temp dir.
fn local_unit(dir: &TempDir, unit: &str) -> PathBuf {
    let path = dir.path().join("nodescope.service");
    std::fs::write(&path, unit.replace(SHIPPED_BIN, BIN)).unwrap();
    path
}

#[test]
fn systemd_unit_verifies() {
    require_tool("systemd-analyze", "systemd");
    let unit = shipped_unit();
    assert_eq!(
        unit_value(&unit, "ExecStart").as_deref(),
        Some(&*format!("{SHIPPED_BIN} run --config {SHIPPED_CONFIG}"))
    );
    assert_eq!(unit_value(&unit, "Type").as_deref(), Some("notify"));
    let dir = TempDir::new("unit");
    let path = local_unit(&dir, &unit);
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&path));
    let text = out.text();
    let ours: Vec<&str> = text.lines().filter(|l| l.contains("nodescope")).collect();
    assert!(out.ok && ours.is_empty(), "systemd-analyze verify: {text}");

    // The same check does catch a broken unit.
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    let bad = broken.join("nodescope.service");
    std::fs::write(&bad, unit.replace(SHIPPED_BIN, BIN).replace("[Service]\n", "[Service]\nWatchDogSec=30s\n"))
        .unwrap();
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&bad));
    assert!(out.text().contains("Unknown key 'WatchDogSec'"), "verify missed a misspelt key: {}", out.text());

    // systemd's own rating of the sandbox: 0 is locked down, 10 is none.
    let out = run(Command::new("systemd-analyze").args(["security", "--offline=yes", "--no-pager"]).arg(&path));
    let level = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("→ Overall exposure level for nodescope.service: "))
        .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {}", out.text()));
    eprintln!("systemd-analyze security: exposure {level}");
    assert!(level <= 4.0, "the unit's sandbox got looser: exposure {level}\n{}", out.stdout);
}

/// Capability numbers (capability.h) of the names the unit may use.
fn cap_number(name: &str) -> u32 {
    match name {
        "CAP_DAC_READ_SEARCH" => 2,
        "CAP_SETGID" => 6,
        "CAP_SETUID" => 7,
        "CAP_NET_ADMIN" => 12,
        "CAP_SYS_PTRACE" => 19,
        "CAP_SYS_ADMIN" => 21,
        "CAP_SYS_RESOURCE" => 24,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        other => panic!("capability {other} not known to this test"),
    }
}

fn status_caps(pid: u32, field: &str) -> u64 {
    let status = read(Path::new(&format!("/proc/{pid}/status")));
    let hex = status.lines().find_map(|l| l.strip_prefix(&format!("{field}:\t"))).unwrap();
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

/// `setpriv` arguments that give a root process what systemd gives the
/// unit's main process: its capability bounding set (and so, as root, its
/// permitted and effective sets) and no_new_privs.
fn unit_privileges(unit: &str) -> (Vec<String>, u64) {
    let caps: Vec<String> =
        unit_value(unit, "CapabilityBoundingSet").unwrap().split_whitespace().map(String::from).collect();
    let mask = caps.iter().fold(0u64, |m, c| m | 1 << cap_number(c));
    let bounding =
        caps.iter().map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase())).collect::<Vec<_>>().join(",");
    let mut args = vec!["setpriv".to_string(), format!("--bounding-set=-all,{bounding}"), "--inh-caps=-all".into()];
    if unit_value(unit, "NoNewPrivileges").as_deref() == Some("yes") {
        args.push("--no-new-privs".into());
    }
    args.push("--".into());
    (args, mask)
}

/// Every syscall the unit's SystemCallFilter allows, with the groups
/// expanded as this host's systemd defines them.
fn allowed_syscalls(unit: &str) -> BTreeSet<String> {
    let listing = run(Command::new("systemd-analyze").arg("syscall-filter")).stdout;
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = None;
    for line in listing.lines() {
        if line.starts_with('@') {
            current = Some(line.trim().to_string());
            groups.entry(line.trim().to_string()).or_default();
        } else if line.trim().is_empty() || line.trim_start().starts_with('#') {
            if line.trim_start().starts_with("# Ungrouped") || line.trim_start().starts_with("# Unlisted") {
                current = None;
            }
        } else if let Some(g) = &current {
            groups.get_mut(g).unwrap().push(line.trim().to_string());
        }
    }
    fn expand(name: &str, groups: &BTreeMap<String, Vec<String>>, out: &mut BTreeSet<String>) {
        match groups.get(name) {
            Some(members) => members.iter().for_each(|m| expand(m, groups, out)),
            None if name.starts_with('@') => panic!("syscall group {name} unknown to this systemd"),
            None => {
                out.insert(name.to_string());
            }
        }
    }
    let mut allowed = BTreeSet::new();
    for entry in unit_value(unit, "SystemCallFilter").unwrap().split_whitespace() {
        expand(entry, &groups, &mut allowed);
    }
    allowed
}

/// Syscall names from an `strace -c` summary table.
fn strace_summary(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('%') && !l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().last())
        .filter(|name| *name != "total" && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .map(String::from)
        .collect()
}

/// The agent run the way the unit runs it: only the unit's capabilities
/// (bounding set and no_new_privs, applied with setpriv), its watchdog
/// (NOTIFY_SOCKET, WATCHDOG_USEC from WatchdogSec), and under strace so every
/// syscall it makes is checked against the unit's SystemCallFilter. Each
/// signal must work: its hooks load, and its figures agree with the node.
#[test]
fn agent_works_with_the_units_privileges() {
    require_root();
    require_tool("systemd-analyze", "systemd");
    require_tool("setpriv", "util-linux");
    require_tool("strace", "strace");
    let unit = shipped_unit();
    let (setpriv, unit_caps) = unit_privileges(&unit);
    // The agent keeps what the unit grants and this test runner has.
    let expected_caps = unit_caps & status_caps(std::process::id(), "CapBnd");

    // `nodescope probes` with the same privileges: every hook loads.
    let out = run(Command::new(&setpriv[0]).args(&setpriv[1..]).args([BIN, "probes"]));
    assert!(out.ok, "nodescope probes under the unit's capabilities: {}", out.text());

    let dir = TempDir::new("unit-run");
    let notify = UnixDatagram::bind(dir.path().join("notify.sock")).unwrap();
    notify.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let watchdog = unit_value(&unit, "WatchdogSec").unwrap();
    let watchdog_secs: u64 = watchdog.trim_end_matches('s').parse().unwrap();
    let syscalls = dir.path().join("syscalls.txt");
    let mut wrapper = setpriv.clone();
    wrapper.extend([
        "strace".into(),
        "-f".into(),
        "-qq".into(),
        "-c".into(),
        "-o".into(),
        syscalls.display().to_string(),
        "--".into(),
    ]);
    let env = vec![
        ("NOTIFY_SOCKET".to_string(), dir.path().join("notify.sock").display().to_string()),
        ("WATCHDOG_USEC".to_string(), (watchdog_secs * 1_000_000).to_string()),
    ];

    let scene = Scene::start(&wrapper, &env);
    let agent_pid = scene.agent.pid;
    assert_eq!(
        status_caps(agent_pid, "CapEff"),
        expected_caps,
        "the agent's effective capabilities are not the unit's bounding set"
    );
    assert_eq!(status_caps(agent_pid, "CapBnd"), expected_caps);

    // systemd hears READY=1 (queued while the scene was set up), then
    // watchdog pings well within WatchdogSec/2.
    let mut buf = [0u8; 4096];
    let mut queued = Vec::new();
    notify.set_nonblocking(true).unwrap();
    while let Ok(n) = notify.recv(&mut buf) {
        queued.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(queued.iter().any(|m| m.lines().any(|l| l == "READY=1")), "no READY=1 on NOTIFY_SOCKET: {queued:?}");
    notify.set_nonblocking(false).unwrap();
    let mut messages: Vec<(Instant, String)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(6);
    while Instant::now() < deadline {
        if let Ok(n) = notify.recv(&mut buf) {
            messages.push((Instant::now(), String::from_utf8_lossy(&buf[..n]).into_owned()));
        }
    }
    let pings: Vec<Instant> =
        messages.iter().filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1")).map(|(t, _)| *t).collect();
    assert!(pings.len() >= 3, "watchdog pings in 6 s with agent.interval 1s: {messages:?}");
    let max_gap = pings.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    eprintln!("watchdog: {} pings in 6 s, longest gap {max_gap:?} (WatchdogSec={watchdog})", pings.len());
    assert!(max_gap < Duration::from_secs(watchdog_secs) / 2, "longest gap between watchdog pings {max_gap:?}");

    scene.assert_signals_work();
    let log = scene.agent.log();
    drop(scene);

    // A signal that cannot start is logged as an error (and turned off).
    for line in log.lines() {
        assert!(!line.contains("ERROR"), "a signal failed under the unit's privileges: {line}\n{log}");
    }
    let used = strace_summary(&read(&syscalls));
    let allowed = allowed_syscalls(&unit);
    let denied: Vec<&String> = used.iter().filter(|s| !allowed.contains(*s)).collect();
    eprintln!("the agent made {} distinct syscalls, all allowed by the unit's SystemCallFilter", used.len());
    // bpf(2) loads and attaches every program (tp_btf and iterator links;
    // classic tracepoints, which add perf_event_open, only with
    // [disk] method = "syscalls")
    assert!(used.contains("bpf"), "strace saw no BPF work: {used:?}");
    assert!(denied.is_empty(), "syscalls the unit's SystemCallFilter would refuse with EPERM: {denied:?}");
}

// ---------------------------------------------------------------- configs

fn check_config(path: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("check-config").arg(path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd)
}

#[test]
fn example_configs_pass_check_config() {
    // The example starts with discovery: no [[targets]].
    let example = deploy("systemd/nodescope.toml");
    let out = check_config(&example, &[]);
    assert!(out.ok, "{}: {}", example.display(), out.text());
    eprintln!("{}", out.stdout.trim());
    assert!(out.stdout.contains("(0 targets, discovery)"), "{}", out.stdout);
    // Its explicit targets, commented out ("#[[targets]]", "#name = ..."),
    // as an operator would enable them: every "#" before a key or table removed.
    let text = std::fs::read_to_string(&example).unwrap();
    let pinned: String = text
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if !rest.is_empty() && !rest.starts_with([' ', '#']) => rest,
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let dir = TempDir::new("example-pinned");
    let pinned_file = dir.path().join("nodescope.toml");
    std::fs::write(&pinned_file, pinned).unwrap();
    let out = check_config(&pinned_file, &[]);
    assert!(out.ok, "the example with its targets uncommented: {}", out.text());
    assert!(out.stdout.contains("(2 targets)"), "{}", out.stdout);

    // The unit's ExecStartPre, as systemd would run it.
    let unit = shipped_unit();
    let pre = unit_value(&unit, "ExecStartPre").unwrap();
    let args: Vec<String> = pre
        .replace(SHIPPED_BIN, BIN)
        .replace(SHIPPED_CONFIG, &example.display().to_string())
        .split_whitespace()
        .map(String::from)
        .collect();
    let out = run(Command::new(&args[0]).args(&args[1..]));
    assert!(out.ok, "ExecStartPre {pre}: {}", out.text());

    // The ConfigMap's file, with the DaemonSet's environment overrides.
    let manifest = Manifest::load();
    let dir = TempDir::new("configmap");
    let file = dir.path().join("nodescope.toml");
    std::fs::write(&file, manifest.config_toml()).unwrap();
    let env = manifest.env_with_pod_ip("10.0.0.7");
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = check_config(&file, &env_refs);
    assert!(out.ok, "the ConfigMap's nodescope.toml with {env:?}: {}", out.text());
}

// ---------------------------------------------------------------- kubernetes

/// YAML goes through the PyYAML that kubernetes-validate brings, in the
/// project's PyPI venv (`common::pytool`; `cargo xtask test` fills it).
fn yaml_docs(path: &Path) -> Vec<Value> {
    let out = run(Command::new(pytool("python3"))
        .args([
            "-c",
            "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None], sys.stdout)",
        ])
        .arg(path));
    assert!(out.ok, "{} is not valid YAML: {}", path.display(), out.stderr);
    serde_json::from_str(&out.stdout).unwrap()
}

/// `kubectl kustomize DIR` (kustomize is built into kubectl; the tests' own
/// kubectl, from the PyPI tools), written to a file in `out`.
fn kustomize(dir: &str, out: &TempDir) -> PathBuf {
    let rendered = run(Command::new(pytool("kubectl")).arg("kustomize").arg(deploy(dir)));
    assert!(rendered.ok, "kubectl kustomize {dir}: {}", rendered.text());
    let file = out.path().join(format!("{}.yaml", dir.replace('/', "-")));
    std::fs::write(&file, &rendered.stdout).unwrap();
    file
}

struct Manifest {
    docs: Vec<Value>,
}

impl Manifest {
    /// The rendered kustomize base.
    fn load() -> Manifest {
        Self::render("kubernetes/base")
    }

    fn render(dir: &str) -> Manifest {
        let tmp = TempDir::new("kustomize");
        Manifest { docs: yaml_docs(&kustomize(dir, &tmp)) }
    }

    fn kind(&self, kind: &str) -> &Value {
        let found: Vec<&Value> = self.docs.iter().filter(|d| d["kind"] == kind).collect();
        assert_eq!(found.len(), 1, "one {kind} in the manifest");
        found[0]
    }

    fn pod(&self) -> &Value {
        &self.kind("DaemonSet")["spec"]["template"]
    }

    fn container(&self) -> &Value {
        &self.pod()["spec"]["containers"][0]
    }

    fn config_toml(&self) -> String {
        self.kind("ConfigMap")["data"]["nodescope.toml"].as_str().unwrap().to_string()
    }

    /// The container's environment with `$(POD_IP)` expanded, as the kubelet does.
    fn env_with_pod_ip(&self, ip: &str) -> Vec<(String, String)> {
        self.container()["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| Some((e["name"].as_str()?.to_string(), e["value"].as_str()?.replace("$(POD_IP)", ip))))
            .collect()
    }

    /// The container's command and args, as the kubelet runs them.
    fn command(&self) -> Vec<String> {
        let c = self.container();
        let list = |k: &str| -> Vec<String> {
            c[k].as_array().into_iter().flatten().map(|v| v.as_str().unwrap().to_string()).collect()
        };
        [list("command"), list("args")].concat()
    }

    /// The capabilities the container adds, as `CAP_` names.
    fn capabilities(&self) -> Vec<String> {
        let caps = &self.container()["securityContext"]["capabilities"];
        assert_eq!(caps["drop"], serde_json::json!(["ALL"]), "the container drops every capability first");
        caps["add"].as_array().unwrap().iter().map(|c| format!("CAP_{}", c.as_str().unwrap())).collect()
    }
}

#[test]
fn kubernetes_manifests_validate() {
    let validate = pytool("kubernetes-validate");
    let tmp = TempDir::new("kustomize");
    for dir in ["kubernetes/base", "kubernetes/overlays/example"] {
        let file = kustomize(dir, &tmp);
        // The newest API the validator knows, and 1.28, the oldest release
        // still common in managed clusters. The PodMonitor and
        // PrometheusRule are checked against their CRDs' schemas below
        // (kubernetes_crd_objects_validate).
        for version in [None, Some("1.28.0")] {
            let mut cmd = Command::new(&validate);
            cmd.arg("--strict");
            if let Some(v) = version {
                cmd.args(["-k", v]);
            }
            let out = run(cmd.arg(&file));
            assert!(out.ok && !out.text().contains("ERROR"), "kubernetes-validate {dir} {version:?}: {}", out.text());
            let passed = out.text().lines().filter(|l| l.starts_with("INFO") && l.contains("passed")).count();
            assert!(passed >= 5, "kubernetes-validate {dir} passed only {passed} resources: {}", out.text());
            eprintln!("{}", out.text().trim());
        }
    }
    let overlay = Manifest::render("kubernetes/overlays/example");
    assert!(overlay.container()["image"].as_str().unwrap().starts_with("registry.example.com/nodescope:"));
    assert_eq!(overlay.pod()["spec"]["nodeSelector"]["nodescope.io/watch"], "true");
    for kind in ["PodMonitor", "PrometheusRule", "DaemonSet", "ConfigMap", "Service", "ServiceAccount"] {
        assert_eq!(overlay.kind(kind)["metadata"]["namespace"], "nodescope", "{kind}'s namespace");
    }

    // What the schema cannot know: the parts agree with each other and with the agent.
    let m = Manifest::load();
    let pod = m.pod();
    let spec = &pod["spec"];
    assert_eq!(spec["hostPID"], true, "host pids: the agent reads /proc/PID of the nodes");
    let c = m.container();
    let port = c["ports"].as_array().unwrap().iter().find(|p| p["name"] == "metrics").expect("a port named metrics");
    assert_eq!(port["containerPort"], 9464);
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9464");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/health/live");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/health/agent");
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(c[probe]["httpGet"]["port"], "metrics");
    }
    assert!(m.env_with_pod_ip("10.0.0.7").contains(&("NODESCOPE_HTTP_LISTEN".into(), "10.0.0.7:9464".into())));
    for k in ["requests", "limits"] {
        assert!(c["resources"][k]["cpu"].is_string() && c["resources"][k]["memory"].is_string(), "resources.{k}");
    }
    // Not privileged, no host network (the agent enters each node's network
    // namespace itself), a read-only root and the runtime's seccomp profile;
    // the capabilities are the ones tests/image.rs runs the image with.
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert!(spec["hostNetwork"].is_null() || spec["hostNetwork"] == false, "hostNetwork");
    assert!(spec["securityContext"]["privileged"].is_null());
    assert_eq!(
        m.capabilities(),
        [
            "CAP_BPF",
            "CAP_PERFMON",
            "CAP_SYS_ADMIN",
            "CAP_SYS_PTRACE",
            "CAP_DAC_READ_SEARCH",
            "CAP_SETUID",
            "CAP_SETGID"
        ]
    );
    // downward API: the pod's IP, node and pod names
    let fields: BTreeMap<&str, &str> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?, e["valueFrom"]["fieldRef"]["fieldPath"].as_str()?)))
        .collect();
    assert_eq!(fields.get("NODE_NAME"), Some(&"spec.nodeName"));
    assert_eq!(fields.get("POD_NAME"), Some(&"metadata.name"));
    assert_eq!(fields.get("POD_IP"), Some(&"status.podIP"));
    let mounts: BTreeMap<&str, &Value> =
        c["volumeMounts"].as_array().unwrap().iter().map(|v| (v["mountPath"].as_str().unwrap(), v)).collect();
    let volumes: BTreeMap<&str, &Value> =
        spec["volumes"].as_array().unwrap().iter().map(|v| (v["name"].as_str().unwrap(), v)).collect();
    for (path, read_only) in
        [("/sys/fs/cgroup", true), ("/etc/nodescope", true), ("/var/lib/nodescope", false), ("/sys/fs/bpf", false)]
    {
        let mount = mounts.get(path).unwrap_or_else(|| panic!("no volume mounted at {path}"));
        assert_eq!(mount["readOnly"].as_bool().unwrap_or(false), read_only, "{path} readOnly");
        let volume = volumes[mount["name"].as_str().unwrap()];
        if path != "/etc/nodescope" {
            assert_eq!(volume["hostPath"]["path"], path, "{path} is the host's");
        }
    }
    // A node's data dir is read inside its own container through
    // /proc/PID/root, so no node volume is mounted into the agent: only the
    // kernel and cgroup views above and the config. That needs the host's
    // pid namespace.
    assert_eq!(
        m.kind("DaemonSet")["spec"]["template"]["spec"]["hostPID"],
        true,
        "hostPID: /proc/PID/root of the node's pod"
    );
    assert!(!m.config_toml().lines().any(|l| l.trim().starts_with("datadir")), "no host data dir in the config");
    let node_volumes: Vec<&str> = mounts
        .keys()
        .copied()
        .filter(|p| !["/sys/fs/cgroup", "/etc/nodescope", "/var/lib/nodescope", "/sys/fs/bpf"].contains(p))
        .collect();
    assert!(node_volumes.is_empty(), "node volumes mounted into the agent: {node_volumes:?}");
    // The command reads the ConfigMap's key where it is mounted.
    let cm_volume =
        volumes.values().find(|v| v["configMap"]["name"] == m.kind("ConfigMap")["metadata"]["name"]).unwrap();
    let cm_mount = mounts.values().find(|v| v["name"] == cm_volume["name"]).unwrap();
    let cmd = m.command();
    let config_arg = &cmd[cmd.iter().position(|a| a == "--config").unwrap() + 1];
    assert_eq!(config_arg, &format!("{}/nodescope.toml", cm_mount["mountPath"].as_str().unwrap()));
    // The headless Service selects the pods and is the name prometheus.yml resolves.
    let svc = m.kind("Service");
    assert_eq!(svc["spec"]["clusterIP"], "None");
    assert_eq!(svc["spec"]["publishNotReadyAddresses"], true, "an agent reporting a sick node must still be scraped");
    for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&pod["metadata"]["labels"][k], v, "Service selector {k}");
    }
    let dns = format!(
        "{}.{}.svc.cluster.local",
        svc["metadata"]["name"].as_str().unwrap(),
        svc["metadata"]["namespace"].as_str().unwrap()
    );
    assert!(read(&deploy("prometheus/prometheus.yml")).contains(&dns), "prometheus.yml does not scrape {dns}");
}

/// Validates JSON documents against a CustomResourceDefinition's v1 schema
/// (its `openAPIV3Schema`), as the API server would with strict field
/// validation: the schema is structural, so an object that lists its
/// properties takes no others (unless it says `additionalProperties` or
/// `x-kubernetes-preserve-unknown-fields`). A Go pattern's inline `(?i)`
/// moves to the front, where Python's regular expressions take it. Uses the
/// jsonschema that
/// kubernetes-validate brings and validates with; one line per error, empty
/// when valid.
fn crd_errors(crd: &Path, docs: &[Value]) -> String {
    let dir = TempDir::new("schema");
    let file = dir.path().join("docs.json");
    std::fs::write(&file, serde_json::to_string(docs).unwrap()).unwrap();
    let script = "import json, sys, yaml, jsonschema\n\
                  crd = yaml.safe_load(open(sys.argv[1]))\n\
                  assert crd['kind'] == 'CustomResourceDefinition', crd['kind']\n\
                  schema = next(v for v in crd['spec']['versions'] if v['name'] == 'v1')['schema']['openAPIV3Schema']\n\
                  def strict(s):\n\
                  \x20   if isinstance(s, dict):\n\
                  \x20       if 'properties' in s and 'additionalProperties' not in s \\\n\
                  \x20               and not s.get('x-kubernetes-preserve-unknown-fields'):\n\
                  \x20           s['additionalProperties'] = False\n\
                  \x20       if '(?i)' in s.get('pattern', '') and not s['pattern'].startswith('(?i)'):\n\
                  \x20           s['pattern'] = '(?i)' + s['pattern'].replace('(?i)', '')\n\
                  \x20       for v in s.values(): strict(v)\n\
                  \x20   elif isinstance(s, list):\n\
                  \x20       for v in s: strict(v)\n\
                  strict(schema)\n\
                  jsonschema.Draft7Validator.check_schema(schema)\n\
                  v = jsonschema.Draft7Validator(schema)\n\
                  for i, d in enumerate(json.load(open(sys.argv[2]))):\n\
                  \x20   for e in v.iter_errors(d):\n\
                  \x20       print(i, '/'.join(map(str, e.absolute_path)), e.message)\n";
    let out = run(Command::new(pytool("python3")).args(["-c", script]).arg(crd).arg(&file));
    assert!(out.ok, "jsonschema: {}", out.text());
    out.stdout
}

/// prometheus-operator's objects: the PrometheusRule is what
/// generate-prometheusrule.sh makes of alerts.yml today, both objects pass
/// their CRDs' schemas (tests/schemas: prometheus-operator's own CRDs,
/// unchanged; a misspelt field or a bad duration fails them), and the rules inside pass
/// `promtool check rules` and alerts_test.yml's unit tests.
#[test]
fn prometheus_operator_objects_validate() {
    let script = deploy("kubernetes/components/prometheus-operator/generate-prometheusrule.sh");
    let out = run(Command::new("sh").arg(&script).arg("--check"));
    assert!(out.ok, "the PrometheusRule is not what the script makes of alerts.yml: {}", out.text());

    let m = Manifest::render("kubernetes/overlays/example");
    let schemas = repo().join("tests/schemas");
    for (kind, crd) in [
        ("PodMonitor", "monitoring.coreos.com_podmonitors.yaml"),
        ("PrometheusRule", "monitoring.coreos.com_prometheusrules.yaml"),
    ] {
        let doc = m.kind(kind).clone();
        let errors = crd_errors(&schemas.join(crd), std::slice::from_ref(&doc));
        assert!(errors.is_empty(), "{kind} against its CRD's schema:\n{errors}");
        // the check can fail: an unknown field and a duration the CRD refuses
        let mut misspelt = doc.clone();
        misspelt["spec"]["intervall"] = "15s".into();
        let mut bad_duration = doc.clone();
        if kind == "PodMonitor" {
            bad_duration["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds".into();
        } else {
            bad_duration["spec"]["groups"][0]["rules"][0]["for"] = "1 minute".into();
        }
        let errors = crd_errors(&schemas.join(crd), &[misspelt, bad_duration]);
        assert!(errors.lines().any(|l| l.starts_with("0 ")) && errors.lines().any(|l| l.starts_with("1 ")), "{errors}");
    }

    // The PodMonitor scrapes the DaemonSet's pods on its metrics port (its
    // job label is free: NodescopeDown matches agents under any job).
    let pm = m.kind("PodMonitor");
    for (k, v) in pm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&m.pod()["metadata"]["labels"][k], v, "PodMonitor selector {k}");
    }
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["path"], "/metrics");

    // The rules inside, as Prometheus would load them.
    require_tool("promtool", "prometheus");
    let rule = m.kind("PrometheusRule");
    let groups = rule["spec"]["groups"].as_array().unwrap();
    let names: BTreeSet<&str> = groups.iter().map(|g| g["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), groups.len(), "group names must be unique (the CRD keys the list by name)");
    let dir = TempDir::new("promrule");
    let rules_file = dir.path().join("rules.json");
    std::fs::write(&rules_file, serde_json::to_string(&rule["spec"]).unwrap()).unwrap();
    let out = run(Command::new("promtool").args(["check", "rules"]).arg(&rules_file));
    assert!(out.ok, "promtool check rules on the PrometheusRule's groups: {}", out.text());
    assert!(out.stdout.contains(&format!("SUCCESS: {} rules found", alert_rules().len())), "{}", out.text());
    let tests = read(&deploy("prometheus/alerts_test.yml"));
    assert!(tests.contains("- alerts.yml"), "alerts_test.yml no longer loads alerts.yml by that name");
    let tests_file = dir.path().join("alerts_test.yml");
    std::fs::write(&tests_file, tests.replace("- alerts.yml", "- rules.json")).unwrap();
    let out = run(Command::new("promtool").args(["test", "rules"]).arg(&tests_file));
    assert!(out.ok && out.stdout.contains("SUCCESS"), "alerts_test.yml on the PrometheusRule's rules: {}", out.text());
}

/// The DaemonSet's command line, run as the container would run it: from a
/// cgroup namespace of its own (as container runtimes give on cgroup2
/// hosts), with the ConfigMap's config and the pod's environment. Its
/// `--cgroupns` must put the agent in the host's cgroup namespace, and it
/// must serve its probe endpoints.
#[test]
fn daemonset_command_runs_in_the_hosts_cgroup_namespace() {
    require_root();
    require_tool("unshare", "util-linux");
    let m = Manifest::load();
    let dir = TempDir::new("daemonset");
    let config = dir.path().join("nodescope.toml");
    std::fs::write(&config, m.config_toml()).unwrap();
    let port = free_port();
    // On a Kubernetes host pid 1 is the host's init. Here it may be a
    // supervisor whose namespaces this test may not read; the test itself
    // runs in the initial cgroup namespace, so it stands in for pid 1.
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/cgroup")).unwrap();
    let me = std::process::id().to_string();
    assert_eq!(ns(&me), Path::new(INITIAL_CGROUP_NS), "the test must run in the host's cgroup namespace");
    let cmd: Vec<String> = m
        .command()
        .into_iter()
        .map(|a| {
            if a == SHIPPED_BIN {
                BIN.to_string()
            } else if a == SHIPPED_CONFIG {
                config.display().to_string()
            } else {
                a
            }
        })
        .map(|a| a.replace("/proc/1/ns/cgroup", &format!("/proc/{me}/ns/cgroup")))
        .collect();
    assert!(
        cmd.iter().any(|a| a.contains(&format!("/proc/{me}/ns/cgroup"))),
        "the command does not enter pid 1's cgroup namespace: {cmd:?}"
    );
    let cgroup = Cgroup::new();
    // Without --cgroupns, a private cgroup namespace hides the host's paths.
    let private = run(Command::new("sh").arg("-c").arg(format!(
        "echo $$ > '{}/cgroup.procs' && exec unshare --cgroup cat /proc/self/cgroup",
        cgroup.path.display()
    )));
    assert!(private.ok && private.stdout.lines().any(|l| l == "0::/"), "unshare --cgroup: {}", private.text());

    let mut child = Command::new("sh");
    child
        .arg("-c")
        .arg(format!("echo $$ > '{}/cgroup.procs' && exec unshare --cgroup \"$@\"", cgroup.path.display()))
        .arg("sh")
        .args(&cmd)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.path().join("out.log")).unwrap())
        .stderr(std::fs::File::create(dir.path().join("err.log")).unwrap());
    for (k, v) in m.env_with_pod_ip("127.0.0.1") {
        child.env(k, v.replace(":9464", &format!(":{port}")));
    }
    // the state the DaemonSet keeps on the host goes where this test cleans up
    let pins = TempDir(PathBuf::from(format!("/sys/fs/bpf/nodescope-test-{}", std::process::id())));
    child.env("NODESCOPE_AGENT_STATE_DIR", dir.path().join("state")).env("NODESCOPE_AGENT_PIN_DIR", pins.path());
    let mut agent = Guard(child.spawn().unwrap());
    let log = || read(&dir.path().join("err.log"));
    let (status, body) = wait_for("/health/live of the DaemonSet's command", Duration::from_secs(30), || {
        if let Ok(Some(st)) = agent.0.try_wait() {
            panic!("the DaemonSet's command exited with {st}: {}", log());
        }
        http_get(port, "/health/live").ok()
    });
    assert_eq!(status, 200, "GET /health/live: {body}\n{}", log());
    let pid = agent.0.id();
    assert_eq!(ns(&pid.to_string()), Path::new(INITIAL_CGROUP_NS), "the agent is not in the host's cgroup namespace");
    let (status, body) = http_get(port, "/health/ready").unwrap();
    assert!(status == 200 || status == 503, "GET /health/ready: {status} {body}");
    let (status, _) = http_get(port, "/metrics").unwrap();
    assert_eq!(status, 200);
    drop(agent);
    drop(cgroup);
}

/// The kernel's initial cgroup namespace (PROC_CGROUP_INIT_INO).
const INITIAL_CGROUP_NS: &str = "cgroup:[4026531835]";

/// Stops a spawned process by pid when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        stop_child(&mut self.0, Duration::from_secs(10));
    }
}

// ---------------------------------------------------------------- a live agent

/// An agent started with an optional wrapper command (setpriv, strace).
struct RunningAgent {
    child: Child,
    /// The agent's own pid (the wrapper's child when the wrapper forks).
    pid: u32,
    port: u16,
    dir: TempDir,
}

impl RunningAgent {
    fn start(wrapper: &[String], env: &[(String, String)], body: &str) -> RunningAgent {
        let dir = TempDir::new("deploy-agent");
        let port = free_port();
        let config = dir.path().join("nodescope.toml");
        std::fs::write(&config, format!("[http]\nlisten = \"127.0.0.1:{port}\"\n\n{body}")).unwrap();
        let mut argv: Vec<String> = wrapper.to_vec();
        if env.iter().any(|(k, _)| k == "WATCHDOG_USEC") {
            // systemd names the main pid in WATCHDOG_PID; a shell that execs
            // the agent knows it
            argv.extend(["sh".into(), "-c".into(), "WATCHDOG_PID=$$ exec \"$0\" \"$@\"".into()]);
        }
        argv.extend([BIN.to_string(), "run".into(), "--config".into(), config.display().to_string()]);
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .envs(env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("agent.out")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("agent.err")).unwrap());
        let child = cmd.spawn().unwrap();
        let mut agent = RunningAgent { pid: child.id(), child, port, dir };
        wait_for("nodescope /metrics", Duration::from_secs(60), || {
            if let Ok(Some(st)) = agent.child.try_wait() {
                panic!("nodescope exited with {st}: {}", agent.log());
            }
            http_get(port, "/metrics").ok().filter(|(s, _)| *s == 200)
        });
        agent.pid = agent_pid(agent.child.id());
        agent
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.err")).unwrap_or_default()
    }

    fn metrics(&self) -> String {
        let (status, body) = http_get(self.port, "/metrics").unwrap();
        assert_eq!(status, 200);
        body
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if self.pid != self.child.id() {
            // SAFETY: a pid found as our own child's child, not yet reaped by it.
            unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        stop_child(&mut self.child, Duration::from_secs(10));
        if std::thread::panicking() {
            eprintln!("--- nodescope log ---\n{}", self.log());
        }
    }
}

/// The nodescope process under `pid`: `pid` itself, or the child a wrapper
/// such as strace forked for it.
fn agent_pid(pid: u32) -> u32 {
    let comm = |p: u32| std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default().trim().to_string();
    if comm(pid) == "nodescope" {
        return pid;
    }
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .find(|c| comm(*c) == "nodescope")
        .unwrap_or_else(|| panic!("no nodescope process under pid {pid} ({})", comm(pid)))
}

/// A litecoind regtest node in its own cgroup with an inbound peer, a
/// closed connection, a failed connect and mined blocks, watched by an agent.
/// Fields drop in order: agent, peers, node, then the cgroup.
struct Scene {
    agent: RunningAgent,
    _peer: Litecoind,
    node: Litecoind,
    _cgroup: Cgroup,
}

/// Nodes run as a user of their own; nobody stands in for it.
const NODE_UID: u32 = 65534;

/// A litecoind regtest node in `cgroup`, running as NODE_UID with its data
/// dir owned by that user (mode 0700 files, as Litecoin Core makes them), so
/// the agent needs its capabilities to read it.
fn start_node_as_user(cgroup: &Cgroup) -> Litecoind {
    require_tool("litecoind", "litecoind");
    require_tool("setpriv", "util-linux");
    let dir = TempDir::new("ltc-user");
    std::os::unix::fs::chown(dir.path(), Some(NODE_UID), Some(NODE_UID)).unwrap();
    let (port, rpcport) = (free_port(), free_port());
    // Debian's litecoind wrapper makes ~/.litecoin: give the user a home.
    let mut args: Vec<String> = [
        format!("--reuid={NODE_UID}"),
        format!("--regid={NODE_UID}"),
        "--clear-groups".into(),
        "env".into(),
        format!("HOME={}", dir.path().display()),
        "litecoind".into(),
    ]
    .to_vec();
    args.extend(regtest_args(dir.path(), port, rpcport));
    args.push("-connect=0".into());
    let child = spawn_in(Some(cgroup), "setpriv", &args, &dir.path().join("stdout.log"));
    let args = args[6..].to_vec();
    let node = Litecoind { child, dir, port, rpcport, args };
    wait_for("litecoind RPC", Duration::from_secs(60), || node.try_cli(&["getblockcount"]).ok());
    let uid = read(Path::new(&format!("/proc/{}/status", node.pid())))
        .lines()
        .find_map(|l| l.strip_prefix("Uid:\t").map(String::from))
        .unwrap();
    assert!(uid.starts_with(&format!("{NODE_UID}\t")), "litecoind runs as {uid}");
    node
}

impl Scene {
    fn start(wrapper: &[String], env: &[(String, String)]) -> Scene {
        let cgroup = Cgroup::new();
        let node = start_node_as_user(&cgroup);
        let body = format!(
            "[agent]\ninterval = \"1s\"\n\n[[targets]]\nname = \"ltc\"\ncgroup = \"{}\"\nchain = \"litecoin\"\ndatadir = \"{}\"\np2p_ports = [{}]\nrpc_ports = [{}]\n",
            cgroup.path.display(),
            node.dir.path().display(),
            node.port,
            node.rpcport
        );
        let agent = RunningAgent::start(wrapper, env, &body);
        let peer = Litecoind::start(None, &[format!("-connect={}", node.addr())]);
        node.wait_peers(1);
        // a connection that opens and closes, so lifetimes are observed
        let visitor = Litecoind::start(None, &[format!("-connect={}", node.addr())]);
        node.wait_peers(2);
        drop(visitor);
        node.wait_peers(1);
        // a connect that fails: nothing listens there
        node.cli(&["addnode", &format!("127.0.0.1:{}", free_port()), "onetry"]);
        node.mine(20);
        Scene { agent, _peer: peer, node, _cgroup: cgroup }
    }

    /// Each signal is on and agrees with an outside source.
    fn assert_signals_work(&self) {
        let m = wait_for("the node's inbound peer in /metrics", Duration::from_secs(30), || {
            let m = self.agent.metrics();
            let inbound = metric_sum(
                &m,
                "nodescope_connection_open",
                &[
                    ("nodescope_target", "ltc"),
                    ("nodescope_connection_direction", "inbound"),
                    ("nodescope_service", "p2p"),
                ],
            );
            let node_inbound = self.node.peers().iter().filter(|p| p["inbound"] == true).count() as f64;
            (inbound == node_inbound && inbound >= 1.0).then_some(m)
        });
        // disk: the node wrote its blocks (mined above)
        let written = metric_sum(&m, "nodescope_file_written_bytes_total", &[("nodescope_target", "ltc")]);
        assert!(written > 0.0, "no file writes of the node seen:\n{m}");
        // resources, with the node under another user: its open descriptors
        // (CAP_SYS_PTRACE), its data dir's size (CAP_DAC_READ_SEARCH) and the
        // write test as its user (CAP_SETUID, CAP_SETGID)
        let fds_seen = metric_sum(&m, "nodescope_process_open_fds", &[("nodescope_target", "ltc")]);
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.node.pid())).unwrap().count() as f64;
        assert!((fds_seen - fds).abs() <= 8.0, "open fds {fds_seen}, /proc says {fds}");
        // the node keeps writing: compare until one reading agrees with du
        let du = || {
            let out = run(Command::new("du").args(["-sb"]).arg(self.node.dir.path().join("regtest")));
            out.stdout
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("du: {}", out.text()))
        };
        let mut last = (0.0, 0.0);
        let agreed = (0..60).any(|_| {
            std::thread::sleep(Duration::from_millis(500));
            let size =
                metric_sum(&self.agent.metrics(), "nodescope_datadir_size_bytes", &[("nodescope_target", "ltc")]);
            last = (size, du());
            (size - last.1).abs() <= last.1 * 0.05
        });
        eprintln!(
            "data dir: nodescope {} bytes, du -sb {}; open fds: nodescope {fds_seen}, /proc {fds}",
            last.0, last.1
        );
        assert!(agreed, "data dir size {}, du -sb says {} (30 s of readings)", last.0, last.1);
        let writable = wait_for("the data dir write test", Duration::from_secs(30), || {
            let m = self.agent.metrics();
            m.contains("nodescope_datadir_writable")
                .then(|| metric_sum(&m, "nodescope_datadir_writable", &[("nodescope_target", "ltc")]))
        });
        assert_eq!(writable, 1.0, "the node's data dir reads as not writable to its user");
        // health: the endpoints answer
        let (status, body) = http_get(self.agent.port, "/health/live").unwrap();
        assert_eq!(status, 200, "/health/live: {body}");
    }
}

// ---------------------------------------------------------------- queries

/// Every PromQL expression the artifacts hold: (where, expr, legend).
fn dashboard_queries(dash: &Value) -> Vec<(String, String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                let title = p["title"].as_str().unwrap_or("?").to_string();
                out.push((
                    format!("panel {title:?}"),
                    t["expr"].as_str().unwrap_or_default().to_string(),
                    t["legendFormat"].as_str().unwrap_or_default().to_string(),
                ));
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

fn grafana() -> Value {
    let path = deploy("grafana/nodescope.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `target` and `instance` variables' label_values(selector, label).
fn variable_queries(dash: &Value) -> Vec<(String, String, String)> {
    dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let q = v["query"]["query"].as_str().or(v["query"].as_str()).unwrap();
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
                .unwrap_or_else(|| panic!("variable query {q}"));
            let (selector, label) = inner.rsplit_once(',').unwrap();
            (v["name"].as_str().unwrap().to_string(), selector.trim().to_string(), label.trim().to_string())
        })
        .collect()
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

const LABEL_LIST_KEYWORDS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"];

/// Splits PromQL into metric names and label names (from `{}` matchers and
/// `by (...)`-style lists), skipping strings, ranges, functions and numbers.
fn promql_names(expr: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let chars: Vec<char> = expr.chars().collect();
    let mut metrics = BTreeSet::new();
    let mut labels = BTreeSet::new();
    let mut i = 0;
    let mut label_list_next = false;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '{' || (c == '(' && label_list_next) {
            let close = if c == '{' { '}' } else { ')' };
            let start = i + 1;
            let mut in_str: Option<char> = None;
            i += 1;
            while i < chars.len() && (in_str.is_some() || chars[i] != close) {
                match in_str {
                    Some(q) if chars[i] == q => in_str = None,
                    Some(_) if chars[i] == '\\' => i += 1,
                    None if chars[i] == '"' || chars[i] == '\'' => in_str = Some(chars[i]),
                    _ => {}
                }
                i += 1;
            }
            let inner: String = chars[start..i.min(chars.len())].iter().collect();
            let mut depth_str: Option<char> = None;
            let mut cur = String::new();
            let mut parts = Vec::new();
            for ch in inner.chars() {
                match depth_str {
                    Some(q) if ch == q => depth_str = None,
                    Some(_) => {}
                    None if ch == '"' || ch == '\'' => depth_str = Some(ch),
                    None if ch == ',' => parts.push(std::mem::take(&mut cur)),
                    None => cur.push(ch),
                }
            }
            parts.push(cur);
            for part in parts {
                let name: String = part.trim().chars().take_while(|c| is_ident(*c)).collect();
                if !name.is_empty() {
                    labels.insert(name);
                }
            }
            label_list_next = false;
            i += 1;
        } else if is_ident_start(c)
            && !(i > 0 && (chars[i - 1].is_ascii_digit() || chars[i - 1] == '.' || chars[i - 1] == '$'))
        {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            if LABEL_LIST_KEYWORDS.contains(&word.as_str()) {
                label_list_next = true;
            } else if KEYWORDS.contains(&word.as_str()) {
            } else if j < chars.len() && chars[j] == '(' {
                // a function or aggregation
            } else if ["by", "without"].iter().any(|k| chars[j..].iter().collect::<String>().starts_with(k)) {
                // an aggregation with its label list first: `sum by (x) (...)`
            } else {
                metrics.insert(word);
            }
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    (metrics, labels)
}

/// `{{label}}` in legends, `$labels.label` in annotations.
fn template_labels(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (open, close) in [("{{", "}}")] {
        let mut rest = text;
        while let Some(s) = rest.find(open) {
            let after = &rest[s + open.len()..];
            let e = after.find(close).unwrap_or(after.len());
            let name = after[..e].trim();
            // Go template actions of annotations (`{{ else }}`, `{{ end }}`) name no label
            if !name.is_empty() && name.chars().all(is_ident) && !["else", "end"].contains(&name) {
                out.insert(name.to_string());
            }
            rest = &after[e..];
        }
    }
    let mut rest = text;
    while let Some(s) = rest.find("$labels.") {
        let after = &rest[s + "$labels.".len()..];
        let name: String = after.chars().take_while(|c| is_ident(*c)).collect();
        out.insert(name);
        rest = after;
    }
    out
}

/// The metric family a sample name belongs to.
fn family(name: &str) -> &str {
    for suffix in ["_bucket", "_count", "_sum"] {
        if let Some(base) = name.strip_suffix(suffix) {
            return base;
        }
    }
    name
}

/// Metrics Prometheus makes itself, not nodescope.
const PROMETHEUS_METRICS: &[&str] = &["up"];

/// Every PromQL expression of alerts.yml and the dashboard: (where, expr,
/// templates), with the template text (annotations, legends) whose label
/// references must exist too.
fn all_queries() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let docs = yaml_docs(&deploy("prometheus/alerts.yml"));
    for group in docs[0]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let annotations = rule["annotations"]
                .as_object()
                .map(|a| a.values().filter_map(|v| v.as_str()).collect::<Vec<_>>().join("\n"))
                .unwrap_or_default();
            out.push((
                format!("alert {}", rule["alert"].as_str().unwrap()),
                rule["expr"].as_str().unwrap().to_string(),
                annotations,
            ));
        }
    }
    let dash = grafana();
    out.extend(dashboard_queries(&dash));
    for (name, selector, label) in variable_queries(&dash) {
        out.push((format!("variable ${name}"), selector, format!("{{{{{label}}}}}")));
    }
    out
}

/// Grafana's variables as a query sees them when "All" is picked.
fn substitute_grafana(expr: &str) -> String {
    expr.replace("$__rate_interval", "15s").replace("$instance", ".*").replace("$target", ".*")
}

/// The dashboard and the alerts, statically: valid JSON with the variables
/// and panels the dashboard promises, every metric documented (docs/metrics.md,
/// or docs/health.md for the health gauges) and every runbook link resolving
/// to a heading.
#[test]
fn dashboard_and_alerts_reference_documented_metrics() {
    let dash = grafana();
    assert_eq!(dash["schemaVersion"], 39);
    let vars = variable_queries(&dash);
    let target = vars.iter().find(|(n, _, _)| n == "target").expect("a `target` variable");
    assert!(target.1.starts_with("nodescope_connection_open") && target.2 == "nodescope_target", "{target:?}");
    let ds = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a data source variable");
    assert_eq!(ds["name"], "DS_PROMETHEUS");
    fn datasources(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(o) => {
                if let Some(Value::Object(ds)) = o.get("datasource") {
                    out.push(ds.get("uid").and_then(|u| u.as_str()).unwrap_or("").to_string());
                }
                o.values().for_each(|v| datasources(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| datasources(v, out)),
            _ => {}
        }
    }
    let mut uids = Vec::new();
    datasources(&dash["panels"], &mut uids);
    assert!(
        !uids.is_empty() && uids.iter().all(|u| u == "${DS_PROMETHEUS}"),
        "panels not on ${{DS_PROMETHEUS}}: {uids:?}"
    );
    let mut ids = BTreeSet::new();
    fn panel_ids(panels: &Value, ids: &mut BTreeSet<u64>) {
        for p in panels.as_array().into_iter().flatten() {
            assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id {}", p["id"]);
            panel_ids(&p["panels"], ids);
        }
    }
    panel_ids(&dash["panels"], &mut ids);

    // docs/metrics.md lists the signals' metrics; docs/health.md its own verdict gauges
    let documented = read(&repo().join("docs/metrics.md")) + &read(&repo().join("docs/health.md"));
    let mut missing = Vec::new();
    for (place, expr, _) in all_queries() {
        let (metrics, _) = promql_names(&expr);
        assert!(!metrics.is_empty(), "{place}: no metric found in {expr}");
        for name in metrics {
            if PROMETHEUS_METRICS.contains(&name.as_str()) {
                continue;
            }
            if !documented.contains(&format!("`{name}`")) && !documented.contains(&format!("`{}`", family(&name))) {
                missing.push(format!("{place}: {name}"));
            }
        }
    }
    assert!(missing.is_empty(), "metrics in neither docs/metrics.md nor docs/health.md:\n{}", missing.join("\n"));

    for (file, anchors) in runbook_anchors() {
        let doc = read(&repo().join(&file));
        let mut slugs: BTreeSet<String> = doc.lines().filter(|l| l.starts_with('#')).map(slug).collect();
        // explicit anchors: <a id="x"></a>
        for part in doc.split("id=\"").skip(1) {
            slugs.insert(part.split('"').next().unwrap().to_string());
        }
        for a in anchors {
            assert!(slugs.contains(&a), "runbook {file}#{a} has no such heading (headings: {slugs:?})");
        }
    }
}

/// Every `(#anchor)` link in docs/operations.md names one of its headings,
/// and every deploy/ file it names exists.
#[test]
fn operations_doc_links_resolve() {
    let doc = read(&repo().join("docs/operations.md"));
    let slugs: BTreeSet<String> = doc.lines().filter(|l| l.starts_with('#')).map(slug).collect();
    for part in doc.split("](#").skip(1) {
        let anchor = part.split(')').next().unwrap();
        assert!(slugs.contains(anchor), "docs/operations.md links to #{anchor}, which is no heading");
    }
    for part in doc.split("deploy/").skip(1) {
        let name: String = part.chars().take_while(|c| c.is_ascii_alphanumeric() || "/._-".contains(*c)).collect();
        let name = name.trim_end_matches('.');
        if name.contains('.') {
            assert!(deploy(name).exists(), "docs/operations.md names deploy/{name}, which does not exist");
        }
    }
}

/// runbook_url targets: file -> anchors.
fn runbook_anchors() -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let docs = yaml_docs(&deploy("prometheus/alerts.yml"));
    for group in docs[0]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let url = rule["annotations"]["runbook_url"]
                .as_str()
                .unwrap_or_else(|| panic!("{} has no runbook_url", rule["alert"]));
            let (file, anchor) = url.split_once('#').unwrap();
            out.entry(file.to_string()).or_default().insert(anchor.to_string());
        }
    }
    out
}

/// GitHub's heading anchors: lower case, punctuation other than `-` and `_`
/// dropped, spaces to `-`.
fn slug(heading: &str) -> String {
    heading
        .trim_start_matches('#')
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Series the scene cannot make, and why; every other dashboard query must
/// return data from the live agent.
const NOT_IN_SCENE: &[(&str, &str)] = &[
    ("nodescope_cgroup_memory_limit_bytes", "the test's cgroup has no memory limit"),
    ("nodescope_datadir_days_until_full", "a regtest data dir does not grow steadily enough for a forecast"),
    ("nodescope_file_sync_errors_total", "no sync call of the scene's node fails (the series appears with an error)"),
    (
        "nodescope_cgroup_cpu_throttled_seconds_total",
        "on a hybrid host the scene's node is in no v1 cpu group of its own (the root is the host's), and cgroup2 carries no cpu controller",
    ),
    (
        "nodescope_cgroup_cpu_throttled_periods_total",
        "on a hybrid host the scene's node is in no v1 cpu group of its own (the root is the host's), and cgroup2 carries no cpu controller",
    ),
];

/// Against a live agent watching a real node, scraped by a real Prometheus
/// with alerts.yml loaded: every alert rule evaluates without error, every
/// dashboard query returns data, and every metric and label name the
/// artifacts use is one the agent exports.
#[test]
fn queries_match_a_live_agent() {
    require_root();
    let scene = Scene::start(&[], &[]);
    scene.assert_signals_work();
    let prom = Prometheus::start(scene.agent.port, Some(&deploy("prometheus/alerts.yml")));
    wait_for("nodescope scraped", Duration::from_secs(30), || {
        prom.query("up{job=\"nodescope\"} == 1").len().eq(&1).then_some(())
    });
    // enough samples for the 15s rate windows
    std::thread::sleep(Duration::from_secs(16));

    let scrape = scene.agent.metrics();
    let mut exported: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in scrape.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let series = line.rsplit_once(' ').unwrap().0;
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let set = exported.entry(name.to_string()).or_default();
        for kv in labels.trim_end_matches('}').split(',').filter(|kv| !kv.is_empty()) {
            set.insert(kv.split_once('=').unwrap().0.to_string());
        }
    }
    let all_labels: BTreeSet<String> =
        exported.values().flatten().cloned().chain(["job", "instance", "le"].map(String::from)).collect();

    let mut problems = Vec::new();
    for (place, expr, templates) in all_queries() {
        let (metrics, labels) = promql_names(&expr);
        for name in &metrics {
            let skip = PROMETHEUS_METRICS.contains(&name.as_str()) || NOT_IN_SCENE.iter().any(|(n, _)| n == name);
            if !skip && !exported.contains_key(name) {
                problems.push(format!("{place}: {name} is not on the agent's /metrics"));
            }
        }
        for label in labels.iter().chain(template_labels(&templates).iter()) {
            if !all_labels.contains(label) {
                problems.push(format!("{place}: label {label} is on no series the agent exports"));
            }
        }
    }

    // The rules load and evaluate against real series without error.
    let rules = prom.api("/api/v1/rules");
    let mut evaluated = 0;
    for group in rules["data"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            evaluated += 1;
            if rule["health"] != "ok" {
                problems.push(format!("alert {}: health {} {}", rule["name"], rule["health"], rule["lastError"]));
            }
        }
    }
    assert_eq!(evaluated, alert_rules().len(), "Prometheus loaded {evaluated} rules");

    let dash = grafana();
    let mut answered = 0;
    for (place, expr, _) in dashboard_queries(&dash) {
        let (metrics, _) = promql_names(&expr);
        let result = prom.query(&substitute_grafana(&expr));
        if result.is_empty() && !metrics.iter().any(|m| NOT_IN_SCENE.iter().any(|(n, _)| n == m)) {
            problems.push(format!("{place}: no data for {expr}"));
        }
        answered += !result.is_empty() as usize;
    }
    for (name, selector, label) in variable_queries(&dash) {
        let values: BTreeSet<String> = prom
            .query(&substitute_grafana(&selector))
            .iter()
            .filter_map(|s| s["metric"][&label].as_str().map(String::from))
            .collect();
        if name == "target" && !values.contains("ltc") {
            problems.push(format!("variable $target does not list the target: {values:?}"));
        }
    }
    eprintln!("{answered} dashboard queries returned data; {evaluated} alert rules evaluated");

    // The agent fits the memory the artifacts give it: its peak RSS plus
    // its BPF maps (charged to its cgroup), from the kernel's own accounts.
    let (rss, maps) = agent_memory(scene.agent.pid);
    let manifest = Manifest::load();
    let k8s_limit = parse_quantity(manifest.container()["resources"]["limits"]["memory"].as_str().unwrap());
    let unit_limit = parse_quantity(&unit_value(&shipped_unit(), "MemoryMax").unwrap());
    eprintln!(
        "agent memory: peak RSS {} MiB + BPF maps {} MiB; limits: DaemonSet {} MiB, unit {} MiB",
        rss >> 20,
        maps >> 20,
        k8s_limit >> 20,
        unit_limit >> 20
    );
    for limit in [k8s_limit, unit_limit] {
        assert!(
            (rss + maps) * 2 <= limit,
            "the agent's {} MiB leave less than half of a {} MiB limit free",
            (rss + maps) >> 20,
            limit >> 20
        );
    }
    assert!(problems.is_empty(), "{}\n\nthe agent exported:\n{scrape}", problems.join("\n"));
    drop(prom);
    drop(scene);
}

/// (peak RSS, memlock of its BPF maps) in bytes, from /proc/PID/status and
/// the maps' fdinfo.
fn agent_memory(pid: u32) -> (u64, u64) {
    let kb = |field: &str| -> u64 {
        let status = read(Path::new(&format!("/proc/{pid}/status")));
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"));
        line.trim().trim_end_matches(" kB").trim().parse::<u64>().unwrap() * 1024
    };
    let mut maps = BTreeMap::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        if std::fs::read_link(fd.path()).map(|l| l == Path::new("anon_inode:bpf-map")).unwrap_or(false) {
            let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy()))
                .unwrap_or_default();
            let field =
                |k: &str| info.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().parse::<u64>().ok());
            if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
                maps.insert(id, memlock);
            }
        }
    }
    assert!(!maps.is_empty(), "no BPF maps held by the agent");
    (kb("VmHWM:"), maps.values().sum())
}

/// "256Mi" (Kubernetes) or "512M" (systemd, 1024-based) in bytes.
fn parse_quantity(q: &str) -> u64 {
    let digits: String = q.chars().take_while(|c| c.is_ascii_digit()).collect();
    let n: u64 = digits.parse().unwrap_or_else(|_| panic!("quantity {q}"));
    n << match &q[digits.len()..] {
        "Ki" | "K" => 10,
        "Mi" | "M" => 20,
        "Gi" | "G" => 30,
        other => panic!("unit {other} of {q}"),
    }
}

#[test]
fn promql_names_splits_metrics_from_labels() {
    let (m, l) = promql_names(
        r#"histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{x="1,2}", y=~"$t"}[5m]))) > 1 and on(job) b / c offset 5m"#,
    );
    assert_eq!(m, ["a_bucket", "b", "c"].map(String::from).into());
    assert_eq!(l, ["job", "le", "x", "y"].map(String::from).into());
    let (m, _) = promql_names("-sum(rate(x_total[$__rate_interval])) * 1e3");
    assert_eq!(m, ["x_total"].map(String::from).into());
    assert_eq!(
        template_labels("{{nodescope_target}} {{ le }} $labels.instance x"),
        ["instance", "le", "nodescope_target"].map(String::from).into()
    );
    assert_eq!(slug("## Kernel tables full"), "kernel-tables-full");
    assert_eq!(slug("### `node_down`"), "node_down");
}

// ---------------------------------------------------------------- alertmanager

/// A real Alertmanager (the Debian package's binary) on loopback with a
/// config file, without cluster gossip; stopped by pid when dropped.
struct Alertmanager {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl Alertmanager {
    fn start(config: &Path) -> Alertmanager {
        require_tool("prometheus-alertmanager", "prometheus-alertmanager");
        let dir = TempDir::new("alertmanager");
        let port = free_port();
        let child = Command::new("prometheus-alertmanager")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            // no gossip listener (it would take 0.0.0.0:9094)
            .arg("--cluster.listen-address=")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("alertmanager.log")).unwrap())
            .spawn()
            .unwrap();
        let mut am = Alertmanager { child, port, dir };
        wait_for("alertmanager ready", Duration::from_secs(30), || {
            if let Ok(Some(st)) = am.child.try_wait() {
                panic!("alertmanager exited with {st}: {}", am.log());
            }
            http_get(port, "/-/ready").ok().filter(|(s, _)| *s == 200)
        });
        am
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("alertmanager.log")).unwrap_or_default()
    }

    /// `amtool alert add` with these labels, optionally with start and end
    /// times (RFC 3339; an end in the past resolves the alert).
    fn add(&self, labels: &[(&str, &str)], start_end: Option<(&str, &str)>) {
        let mut cmd = Command::new("amtool");
        cmd.args(["alert", "add", &format!("--alertmanager.url=http://127.0.0.1:{}", self.port)]);
        if let Some((start, end)) = start_end {
            cmd.args([format!("--start={start}"), format!("--end={end}")]);
        }
        cmd.args(labels.iter().map(|(k, v)| format!("{k}={v}")));
        let out = run(&mut cmd);
        assert!(out.ok, "amtool alert add {labels:?}: {}", out.text());
    }

    /// `GET /api/v2/alerts?<query>`: (alertname, severity, instance,
    /// nodescope_target) of each alert, sorted.
    fn alerts(&self, query: &str) -> Vec<(String, String, String, String)> {
        let (status, body) = http_get(self.port, &format!("/api/v2/alerts?{query}")).unwrap();
        assert_eq!(status, 200, "/api/v2/alerts?{query}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let label = |a: &Value, k: &str| a["labels"][k].as_str().unwrap_or("").to_string();
        let mut out: Vec<_> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|a| (label(a, "alertname"), label(a, "severity"), label(a, "instance"), label(a, "nodescope_target")))
            .collect();
        out.sort();
        out
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(10));
        if std::thread::panicking() {
            eprintln!("--- alertmanager log ---\n{}", self.log());
        }
    }
}

/// RFC 3339 UTC time `secs_ago` seconds before now, as `date` writes it.
fn rfc3339_ago(secs_ago: u64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let out = run(Command::new("date").args(["-u", "-d", &format!("@{}", now - secs_ago), "+%Y-%m-%dT%H:%M:%SZ"]));
    assert!(out.ok, "date: {}", out.text());
    out.stdout.trim().to_string()
}

/// Every `Nodescope...` name in a text.
fn nodescope_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| w.starts_with("Nodescope") && w.len() > "Nodescope".len())
        .map(String::from)
        .collect()
}

/// The example Alertmanager config passes `amtool check-config`, names
/// only alerts alerts.yml has, and the check can fail.
#[test]
fn alertmanager_config_passes_amtool_check() {
    require_tool("amtool", "prometheus-alertmanager");
    let config = deploy("alertmanager/alertmanager.yml");
    let out = run(Command::new("amtool").arg("check-config").arg(&config));
    eprintln!("{}", out.text().trim());
    assert!(out.ok && out.text().contains("SUCCESS"), "amtool check-config: {}", out.text());
    let text = read(&config);
    let inhibit_rules = text.lines().filter(|l| l.trim_start().starts_with("- source_matchers:")).count();
    assert!(out.text().contains(&format!("{inhibit_rules} inhibit rules")), "{}", out.text());

    let alerts: BTreeSet<String> = alert_rules().into_iter().collect();
    let unknown: Vec<String> = nodescope_names(&text).into_iter().filter(|n| !alerts.contains(n)).collect();
    assert!(unknown.is_empty(), "alertmanager.yml names alerts alerts.yml does not have: {unknown:?}");

    // the check does catch a broken config: a matcher that does not parse
    let dir = TempDir::new("amcheck");
    let broken = dir.path().join("alertmanager.yml");
    std::fs::write(&broken, text.replace("['alertname=\"NodescopeNoPeers\"']", "['alertname=~\"(\"']")).unwrap();
    assert_ne!(read(&broken), text, "the broken copy is the same as the config");
    let out = run(Command::new("amtool").arg("check-config").arg(&broken));
    assert!(!out.ok, "amtool check-config passed a broken matcher: {}", out.text());
}

/// The inhibitions of alertmanager.yml, in a real Alertmanager: alerts are
/// posted with amtool, and `GET /api/v2/alerts?inhibited=false` must give
/// exactly those expected to reach someone. Then the source of the biggest
/// group resolves, and what it hid comes back.
#[test]
fn alertmanager_inhibits_symptoms_of_one_cause() {
    require_tool("amtool", "prometheus-alertmanager");
    let am = Alertmanager::start(&deploy("alertmanager/alertmanager.yml"));
    // (alertname, severity, instance, nodescope_target, inhibited)
    let cases: &[(&str, &str, &str, &str, bool)] = &[
        // ltc on h1 is down: its symptoms are muted
        ("NodescopeNodeDown", "critical", "h1:9464", "ltc", false),
        ("NodescopeNoPeers", "critical", "h1:9464", "ltc", true),
        ("NodescopePartitionSuspected", "critical", "h1:9464", "ltc", true),
        ("NodescopeLowPeers", "warning", "h1:9464", "ltc", true),
        ("NodescopeChainStalled", "warning", "h1:9464", "ltc", true),
        ("NodescopeRuleUnknown", "warning", "h1:9464", "ltc", true),
        // what is wrong with ltc beyond the outage still shows
        ("NodescopeDiskLow", "warning", "h1:9464", "ltc", false),
        // a node of the same name on another host is another node
        ("NodescopeNoPeers", "critical", "h2:9464", "ltc", false),
        // btc on h1 is up without peers: NoPeers hides LowPeers and
        // NoOutbound, PartitionSuspected the connect failures
        ("NodescopeNoPeers", "critical", "h1:9464", "btc", false),
        ("NodescopeLowPeers", "warning", "h1:9464", "btc", true),
        ("NodescopeNoOutbound", "warning", "h1:9464", "btc", true),
        ("NodescopePartitionSuspected", "critical", "h1:9464", "btc", false),
        ("NodescopeConnectFailuresHigh", "warning", "h1:9464", "btc", true),
        ("NodescopeChainStalled", "warning", "h1:9464", "btc", false),
        ("NodescopeInodesLow", "warning", "h1:9464", "btc", false),
        // xmr: critical disk and inodes hide their warnings; another
        // alert's warning stays
        ("NodescopeDiskCritical", "critical", "h1:9464", "xmr", false),
        ("NodescopeDiskLow", "warning", "h1:9464", "xmr", true),
        ("NodescopeInodesLow", "critical", "h1:9464", "xmr", false),
        ("NodescopeInodesLow", "warning", "h1:9464", "xmr", true),
        ("NodescopeMemoryHigh", "warning", "h1:9464", "xmr", false),
    ];
    let names: BTreeSet<String> = alert_rules().into_iter().collect();
    for (name, severity, instance, target, _) in cases {
        assert!(names.contains(*name), "{name} is no alert of alerts.yml");
        let mut labels =
            vec![("alertname", *name), ("severity", *severity), ("instance", *instance), ("nodescope_target", *target)];
        if *name == "NodescopeRuleUnknown" {
            labels.push(("nodescope_rule", "chain_stalled"));
        }
        am.add(&labels, None);
    }
    let key = |c: &(&str, &str, &str, &str, bool)| (c.0.to_string(), c.1.to_string(), c.2.to_string(), c.3.to_string());
    let all: Vec<_> = {
        let mut v: Vec<_> = cases.iter().map(key).collect();
        v.sort();
        v
    };
    let reaching = |cases: &[(&str, &str, &str, &str, bool)]| {
        let mut v: Vec<_> = cases.iter().filter(|c| !c.4).map(key).collect();
        v.sort();
        v
    };
    let expected = reaching(cases);
    // the inhibitor learns of source alerts as they arrive: poll, bounded
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = (Vec::new(), Vec::new());
    while Instant::now() < deadline {
        seen = (am.alerts("active=true&inhibited=true"), am.alerts("inhibited=false"));
        if seen.0 == all && seen.1 == expected {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(seen.0, all, "Alertmanager does not hold every posted alert");
    assert_eq!(seen.1, expected, "alerts that reach someone (inhibited=false)");
    eprintln!(
        "{} alerts posted, {} reach someone, {} inhibited",
        all.len(),
        expected.len(),
        all.len() - expected.len()
    );

    // ltc's node comes back (Prometheus sends NodeDown with an end in the
    // past): its no-peers alert pages again, and hides ltc's LowPeers itself.
    am.add(
        &[
            ("alertname", "NodescopeNodeDown"),
            ("severity", "critical"),
            ("instance", "h1:9464"),
            ("nodescope_target", "ltc"),
        ],
        Some((&rfc3339_ago(600), &rfc3339_ago(1))),
    );
    let after: Vec<(&str, &str, &str, &str, bool)> = cases
        .iter()
        .filter(|c| !(c.0 == "NodescopeNodeDown" && c.3 == "ltc"))
        .map(|c| {
            let mut c = *c;
            if c.3 == "ltc" && c.2 == "h1:9464" {
                c.4 = c.0 == "NodescopeLowPeers";
            }
            c
        })
        .collect();
    let expected = reaching(&after);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        seen = am.alerts("inhibited=false");
        if seen == expected {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(seen, expected, "alerts that reach someone once ltc's NodeDown resolved");
    drop(am);
}

// ---------------------------------------------------------------- alerts, live

/// One config tunes both: a real agent whose config shortens no_peers'
/// `for` to 2 s and lowers its severity to warning on one node ("fast"),
/// and leaves another ("slow") at the default 5 minutes, both litecoind
/// with no peer (`-connect=0`, nothing dials them). A real Prometheus
/// loading alerts.yml fires NodescopeNoPeers for fast, with the agent's
/// severity, within a bound, and not for slow, which the agent reports as
/// pending.
#[test]
fn no_peers_alert_follows_the_agents_rule_config() {
    require_root();
    let started = Instant::now();
    let (fast_cg, slow_cg) = (Cgroup::new(), Cgroup::new());
    let fast = Litecoind::start(Some(&fast_cg), &["-connect=0".into()]);
    let slow = Litecoind::start(Some(&slow_cg), &["-connect=0".into()]);
    let target = |name: &str, cg: &Cgroup, node: &Litecoind| {
        format!(
            "[[targets]]\nname = \"{name}\"\ncgroup = \"{}\"\nchain = \"litecoin\"\ndatadir = \"{}\"\np2p_ports = [{}]\nrpc_ports = [{}]\n",
            cg.path.display(),
            node.dir.path().display(),
            node.port,
            node.rpcport
        )
    };
    let body = format!(
        "[agent]\ninterval = \"1s\"\n\n{}\n[targets.rules.no_peers]\nfor = \"2s\"\nseverity = \"warning\"\n\n{}",
        target("fast", &fast_cg, &fast),
        target("slow", &slow_cg, &slow)
    );
    let agent = Agent::start(&body);
    let prom = Prometheus::start(agent.port, Some(&deploy("prometheus/alerts.yml")));
    let no_peers = |alerts: &[Value], target: &str| -> Option<Value> {
        alerts
            .iter()
            .find(|a| a["labels"]["alertname"] == "NodescopeNoPeers" && a["labels"]["nodescope_target"] == target)
            .cloned()
    };
    let t0 = Instant::now();
    let firing = wait_for("NodescopeNoPeers firing for fast in Prometheus", Duration::from_secs(90), || {
        no_peers(&prom.alerts(), "fast").filter(|a| a["state"] == "firing")
    });
    eprintln!(
        "NodescopeNoPeers firing for fast {:.1}s after Prometheus started ({:.1}s after the test began)",
        t0.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let labels = &firing["labels"];
    assert_eq!(labels["severity"], "warning", "the alert's severity is not the agent's config's: {firing}");
    assert_eq!(labels["nodescope_rule_severity"], "warning", "{firing}");
    assert_eq!(labels["job"], "nodescope");
    assert_eq!(labels["instance"], format!("127.0.0.1:{}", agent.port).as_str());
    assert!(
        firing["annotations"]["summary"].as_str().unwrap().starts_with("fast on 127.0.0.1:"),
        "{}",
        firing["annotations"]
    );

    // slow has no peers either, but its no_peers holds for the default 5
    // minutes: the agent says pending, and Prometheus has no alert for it.
    let pending = wait_for("slow's no_peers pending in Prometheus", Duration::from_secs(30), || {
        prom.query("nodescope_rule_state{nodescope_target=\"slow\", nodescope_rule=\"no_peers\"}")
            .first()
            .map(|s| s["value"][1].as_str().unwrap().to_string())
            .filter(|v| v == "1")
    });
    assert_eq!(pending, "1");
    let slow_alert = no_peers(&prom.alerts(), "slow");
    assert!(slow_alert.is_none(), "NodescopeNoPeers for slow, whose verdict is pending: {slow_alert:?}");
    let detailed = agent.json("/health/targets/slow/detailed");
    let rule = detailed["rules"].as_array().unwrap().iter().find(|r| r["id"] == "no_peers").cloned();
    assert_eq!(rule.as_ref().map(|r| r["state"].clone()), Some("pending".into()), "slow's no_peers: {detailed}");

    drop(prom);
    drop(agent);
    drop(slow);
    drop(fast);
    drop(slow_cg);
    drop(fast_cg);
}

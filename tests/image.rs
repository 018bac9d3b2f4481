//! The agent's OCI image, run the way the DaemonSet runs it. The image is
//! built by `cargo xtask image`'s own code (xtask/src/image.rs) from the
//! binary under test; podman runs it with exactly what the rendered
//! kustomize base grants: its capabilities (`--cap-drop=all --cap-add=...`),
//! its host paths and ConfigMap, the host's PID namespace, a read-only root,
//! no privilege escalation, its memory and CPU limits, and a network and
//! cgroup namespace of its own (as a pod on a cgroup2 host gets; the
//! agent's `--cgroupns` argument takes it back to the host's).
//!
//! It watches litecoind in another container (tests/common/container.rs),
//! dialled by a host litecoind over the podman bridge: `/peers` must equal
//! the node's getpeerinfo to the byte, disk and resource figures must agree
//! with the kernel's view, and `/health/ready` must answer 200. Then the
//! same without CAP_SYS_ADMIN: the agent starts, says in one line what it
//! cannot do, and serves the rest.
//!
//! Every container is removed by id when its handle drops, pass or fail.

mod common;

#[allow(dead_code)]
#[path = "../xtask/src/image.rs"]
mod image;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::container::*;
use common::*;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_nodescope");

/// The DaemonSet's host paths for the agent's own state across restarts.
const AGENT_STATE: [&str; 2] = ["/var/lib/nodescope", "/sys/fs/bpf"];
const IMAGE_REPO: &str = "localhost/nodescope-test-agent";

/// The image of the binary under test, built once per test process by the
/// xtask's code; images of earlier binaries are removed first.
fn agent_image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        require_podman();
        let sum = Command::new("sha256sum").arg(BIN).arg(repo_root().join("deploy/Containerfile")).output().unwrap();
        assert!(sum.status.success());
        let digest: String = String::from_utf8_lossy(&sum.stdout).split_whitespace().step_by(2).collect::<String>();
        let tag = format!("{IMAGE_REPO}:{}", &digest[..16]);
        let listed = run_podman(&["images", "--format", "{{.Repository}}:{{.Tag}}", IMAGE_REPO]).unwrap_or_default();
        for old in listed.lines().filter(|t| t.starts_with(IMAGE_REPO) && *t != tag) {
            // in use by a container of another test run: left for later
            let _ = run_podman(&["rmi", old]);
        }
        if !listed.lines().any(|t| t == tag) {
            let started = Instant::now();
            let spec = image::Spec {
                binary: Path::new(BIN),
                containerfile: &repo_root().join("deploy/Containerfile"),
                tag: &tag,
            };
            let id = image::build(&spec).unwrap_or_else(|e| panic!("building the image: {e}"));
            eprintln!("built {tag} ({id}) in {:?}", started.elapsed());
        }
        tag
    })
}

// ---------------------------------------------------------------- the DaemonSet

/// What the rendered DaemonSet grants its container.
struct PodSpec {
    caps: Vec<String>,
    read_only_root: bool,
    host_pid: bool,
    host_network: bool,
    no_new_privileges: bool,
    seccomp: String,
    /// (host path, container path, read-only)
    host_paths: Vec<(String, String, bool)>,
    /// (container path, file name, text) of the ConfigMap's keys
    config_files: Vec<(String, String, String)>,
    command: Vec<String>,
    env: Vec<(String, String)>,
    memory_limit: u64,
    cpu_limit_millis: u64,
}

fn quantity_bytes(q: &str) -> u64 {
    for (suffix, mult) in [("Ki", 1u64 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30)] {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().unwrap() * mult;
        }
    }
    q.parse().unwrap()
}

fn quantity_millis(q: &str) -> u64 {
    match q.strip_suffix('m') {
        Some(n) => n.parse().unwrap(),
        None => (q.parse::<f64>().unwrap() * 1000.0) as u64,
    }
}

/// `kubectl kustomize deploy/kubernetes/base`, read as JSON documents.
fn rendered_base() -> Vec<Value> {
    let out = Command::new(pytool("kubectl"))
        .arg("kustomize")
        .arg(repo_root().join("deploy/kubernetes/base"))
        .output()
        .unwrap();
    assert!(out.status.success(), "kubectl kustomize: {}", String::from_utf8_lossy(&out.stderr));
    let dir = TempDir::new("rendered");
    let file = dir.path().join("base.yaml");
    std::fs::write(&file, &out.stdout).unwrap();
    let json = Command::new(pytool("python3"))
        .args([
            "-c",
            "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], sys.stdout)",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(json.status.success(), "{}", String::from_utf8_lossy(&json.stderr));
    serde_json::from_slice(&json.stdout).unwrap()
}

fn pod_spec() -> PodSpec {
    let docs = rendered_base();
    let one = |kind: &str| docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind}")).clone();
    let ds = one("DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let caps =
        sc["capabilities"]["add"].as_array().unwrap().iter().map(|v| format!("CAP_{}", v.as_str().unwrap())).collect();
    let volumes: BTreeMap<String, Value> = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap().to_string(), v.clone()))
        .collect();
    let mut host_paths = Vec::new();
    let mut config_files = Vec::new();
    for m in c["volumeMounts"].as_array().unwrap() {
        let path = m["mountPath"].as_str().unwrap().to_string();
        let ro = m["readOnly"].as_bool().unwrap_or(false);
        let v = &volumes[m["name"].as_str().unwrap()];
        if let Some(host) = v["hostPath"]["path"].as_str() {
            host_paths.push((host.to_string(), path, ro));
        } else if let Some(cm) = v["configMap"]["name"].as_str() {
            let cm =
                docs.iter().find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == cm).expect("the ConfigMap");
            for (k, text) in cm["data"].as_object().unwrap() {
                config_files.push((path.clone(), k.clone(), text.as_str().unwrap().to_string()));
            }
        } else {
            panic!("a volume this test cannot give podman: {v}");
        }
    }
    let list = |k: &str| -> Vec<String> {
        c[k].as_array().into_iter().flatten().map(|v| v.as_str().unwrap().to_string()).collect()
    };
    let env = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?.to_string(), e["value"].as_str()?.to_string())))
        .collect();
    PodSpec {
        caps,
        read_only_root: sc["readOnlyRootFilesystem"] == true,
        host_pid: spec["hostPID"] == true,
        host_network: spec["hostNetwork"] == true,
        no_new_privileges: sc["allowPrivilegeEscalation"] == false,
        seccomp: sc["seccompProfile"]["type"].as_str().unwrap_or("").to_string(),
        host_paths,
        config_files,
        command: [list("command"), list("args")].concat(),
        env,
        memory_limit: quantity_bytes(c["resources"]["limits"]["memory"].as_str().unwrap()),
        cpu_limit_millis: quantity_millis(c["resources"]["limits"]["cpu"].as_str().unwrap()),
    }
}

/// podman's default seccomp profile with containerd's (1.7 and later) and
/// Docker's (23 and later) rules for BPF: bpf(2) allowed with CAP_BPF,
/// perf_event_open(2) with CAP_PERFMON. Debian 12's podman (containers-common
/// 0.50) allows both only with CAP_SYS_ADMIN, so without that capability
/// this stands in for a Kubernetes node's RuntimeDefault.
fn containerd_like_seccomp(dir: &Path) -> PathBuf {
    let stock = Path::new("/usr/share/containers/seccomp.json");
    let mut profile: Value = serde_json::from_str(&std::fs::read_to_string(stock).unwrap()).unwrap();
    let rules = profile["syscalls"].as_array_mut().unwrap();
    for r in rules.iter_mut() {
        // the rule that refuses them to everyone without CAP_SYS_ADMIN
        if r["action"] == "SCMP_ACT_ERRNO" {
            if let Some(names) = r["names"].as_array_mut() {
                names.retain(|n| n != "bpf" && n != "perf_event_open");
            }
        }
    }
    for (name, cap) in [("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")] {
        let rule = serde_json::json!({"names": [name], "action": "SCMP_ACT_ALLOW", "includes": {"caps": [cap]}});
        rules.push(rule);
    }
    let file = dir.join("seccomp-containerd.json");
    std::fs::write(&file, serde_json::to_string(&profile).unwrap()).unwrap();
    file
}

/// The agent's container, removed by id when dropped.
struct AgentContainer {
    id: String,
    ip: String,
    _dir: TempDir,
}

impl AgentContainer {
    /// Runs the image as the DaemonSet runs it, with `caps` instead of the
    /// spec's when given, `extra` more podman options, and `config_extra`
    /// appended to the ConfigMap's nodescope.toml.
    fn start(pod: &PodSpec, caps: &[String], extra: &[String], config_extra: &str) -> AgentContainer {
        let image = agent_image();
        let dir = TempDir::new("image-agent");
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--name".into(),
            format!(
                "nodescope-test-agent-{}-{}",
                std::process::id(),
                dir.path().file_name().unwrap().to_string_lossy()
            ),
            "--label".into(),
            format!("nodescope-test={}", std::process::id()),
            "--pull=never".into(),
            // this host cannot raise rlimits (no CAP_SYS_RESOURCE)
            "--ulimit".into(),
            "nofile=1024:1024".into(),
            "--ulimit".into(),
            "nproc=1024:1024".into(),
            "--cap-drop=all".into(),
            format!("--cap-add={}", caps.join(",")),
            // a pod's own cgroup namespace, as on cgroup2 hosts
            "--cgroupns=private".into(),
            format!("--memory={}", pod.memory_limit),
            format!("--cpus={}", pod.cpu_limit_millis as f64 / 1000.0),
        ];
        if pod.read_only_root {
            args.push("--read-only".into());
        }
        if pod.host_pid {
            args.push("--pid=host".into());
        }
        assert!(!pod.host_network, "the DaemonSet is meant to run without hostNetwork");
        if pod.no_new_privileges {
            args.extend(["--security-opt".into(), "no-new-privileges".into()]);
        }
        // RuntimeDefault: podman's own profile, unless `extra` names one
        assert_eq!(pod.seccomp, "RuntimeDefault");
        for (host, inside, ro) in &pod.host_paths {
            // the agent's own state goes where this test cleans up (the
            // DaemonSet keeps it on the host); its pins in the container's
            // own bpffs, gone with the container
            let host = match inside.as_str() {
                "/var/lib/nodescope" => {
                    let state = dir.path().join("state");
                    std::fs::create_dir_all(&state).unwrap();
                    state.display().to_string()
                }
                "/sys/fs/bpf" => continue,
                _ => host.clone(),
            };
            args.extend(["--volume".into(), format!("{host}:{inside}:{}", if *ro { "ro" } else { "rw" })]);
        }
        let mut mounted: Vec<String> = Vec::new();
        for (inside, key, text) in &pod.config_files {
            let local = dir.path().join(inside.trim_start_matches('/').replace('/', "_"));
            std::fs::create_dir_all(&local).unwrap();
            let text = if key == "nodescope.toml" { format!("{text}\n{config_extra}") } else { text.clone() };
            std::fs::write(local.join(key), text).unwrap();
            if !mounted.contains(inside) {
                args.extend(["--volume".into(), format!("{}:{inside}:ro", local.display())]);
                mounted.push(inside.clone());
            }
        }
        for (k, v) in &pod.env {
            // In a pod the agent's network namespace holds only the pod IP
            // and loopback; here the IP is known only after the start.
            let v = v.replace("$(POD_IP)", "0.0.0.0");
            args.extend(["--env".into(), format!("{k}={v}")]);
        }
        // a short interval for the test; everything else is the ConfigMap's
        args.extend(["--env".into(), "NODESCOPE_AGENT_INTERVAL=1s".into()]);
        args.extend_from_slice(extra);
        args.extend(["--entrypoint".into(), pod.command[0].clone(), image.to_string()]);
        // pid 1 of this host may be a supervisor whose namespaces the test
        // cannot read; the test runs in the initial cgroup namespace, so it
        // stands in for the host's init
        let me = std::process::id();
        args.extend(pod.command[1..].iter().map(|a| a.replace("/proc/1/ns/cgroup", &format!("/proc/{me}/ns/cgroup"))));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let id = run_podman(&argv).unwrap_or_else(|e| panic!("{e}"));
        let id = id.lines().last().unwrap_or_default().to_string();
        assert_eq!(id.len(), 64, "podman run printed no container id: {id:?}");
        let mut agent = AgentContainer { id, ip: String::new(), _dir: dir };
        agent.ip = run_podman(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", &agent.id]).unwrap();
        wait_for("the agent's /metrics", Duration::from_secs(60), || {
            let state = run_podman(&["inspect", "-f", "{{.State.Status}}", &agent.id]).unwrap_or_default();
            assert_eq!(state, "running", "the agent's container stopped:\n{}", agent.logs());
            agent.get("/metrics").ok().filter(|(s, _)| *s == 200)
        });
        agent
    }

    fn pid(&self) -> u32 {
        run_podman(&["inspect", "-f", "{{.State.Pid}}", &self.id]).unwrap().parse().unwrap()
    }

    fn logs(&self) -> String {
        podman()
            .args(["logs", &self.id])
            .output()
            .map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
            .unwrap_or_default()
    }

    /// HTTP/1.0 GET on the agent's pod address (the podman bridge).
    fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&format!("{}:9464", self.ip).parse().unwrap(), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: nodescope\r\n\r\n")?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        let status = buf.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Ok((status, body))
    }

    fn metrics(&self) -> String {
        let (status, body) = self.get("/metrics").unwrap_or_else(|e| panic!("GET /metrics: {e}\n{}", self.logs()));
        assert_eq!(status, 200, "{body}");
        body
    }

    fn peers(&self, target: &str) -> Option<Vec<Value>> {
        let (_, body) = self.get("/peers").ok()?;
        let v: Value = serde_json::from_str(&body).ok()?;
        v["targets"]
            .as_array()?
            .iter()
            .find(|t| t["name"] == target)
            .map(|t| t["peers"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for AgentContainer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- agent container {} log ---\n{}", self.id, self.logs());
        }
        if let Err(e) = run_podman(&["rm", "-f", "-t", "0", &self.id]) {
            eprintln!("removing the agent container {}: {e}", self.id);
        }
    }
}

/// The target's config lines: the node's container by id prefix, as the
/// example overlay pins one by name. (Inside the image the agent cannot read
/// podman's state files that map names to ids; in a pod it names a
/// container after its pod's hostname.)
fn target_config(node: &ContainerNode) -> String {
    format!("[[targets]]\nname = \"ltc\"\ncontainer = \"{}\"\nchain = \"litecoin\"\n", &node.c.id[..12])
}

fn split_addr(addr: &str) -> (&str, u64) {
    let (ip, port) = addr.rsplit_once(':').unwrap();
    (ip, port.parse().unwrap())
}

fn signature(peers: &[Value]) -> String {
    peers
        .iter()
        .map(|p| format!("{} {} {} {} {};", p["id"], p["addr"], p["inbound"], p["bytessent"], p["bytesrecv"]))
        .collect()
}

/// Empty when the agent lists exactly the node's peers with exactly its bytes.
fn compare_exact(theirs: &[Value], ours: &[Value]) -> String {
    let mut problems = String::new();
    if theirs.len() != ours.len() {
        problems += &format!("the node has {} peers, the agent lists {}\n", theirs.len(), ours.len());
    }
    for p in theirs {
        let (ip, port) = split_addr(p["addr"].as_str().unwrap());
        let Some(o) = ours.iter().find(|o| o["address"] == ip && o["port"] == port) else {
            problems += &format!("peer {} missing from /peers\n", p["addr"]);
            continue;
        };
        let dir = if p["inbound"] == true { "inbound" } else { "outbound" };
        if o["direction"] != dir {
            problems += &format!("peer {}: direction {} but the node says {dir}\n", p["addr"], o["direction"]);
        }
        for (ours_key, theirs_key) in [("bytes_sent", "bytessent"), ("bytes_received", "bytesrecv")] {
            if o[ours_key].as_u64() != p[theirs_key].as_u64() {
                problems += &format!(
                    "peer {}: agent {ours_key} {} vs node {theirs_key} {}\n",
                    p["addr"], o[ours_key], p[theirs_key]
                );
            }
        }
    }
    problems
}

/// Waits until the node's counters hold still across a reading of the
/// agent, then requires /peers to equal them to the byte.
fn assert_peers_exact(node: &ContainerNode, agent: &AgentContainer) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let before = node.peers();
        std::thread::sleep(Duration::from_millis(2500));
        let ours = agent.peers("ltc");
        let after = node.peers();
        let last = if signature(&before) != signature(&after) {
            format!("the node's counters kept moving: {} / {}", signature(&before), signature(&after))
        } else {
            let problems = match &ours {
                Some(ours) => compare_exact(&after, ours),
                None => "no target ltc on /peers\n".to_string(),
            };
            if problems.is_empty() {
                for p in &after {
                    eprintln!(
                        "peer {} sent {} received {} (agent and node agree)",
                        p["addr"], p["bytessent"], p["bytesrecv"]
                    );
                }
                return after;
            }
            format!("{problems}node: {}\nagent: {}", signature(&after), serde_json::to_string(&ours).unwrap())
        };
        assert!(Instant::now() < deadline, "/peers does not match the node's getpeerinfo within 60 s:\n{last}");
    }
}

/// `du -sb` of the node's regtest dir, through its root from the host.
fn du_sb(node: &ContainerNode) -> f64 {
    let dir = format!("/proc/{}/root/data/regtest", node.pid());
    let out = Command::new("du").args(["-sb", &dir]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

/// (VmHWM bytes, CPU seconds) of a pid.
fn rss_and_cpu(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    // utime and stime: fields 14 and 15 of stat(5), 12 and 13 after the comm
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (hwm_kib * 1024, ticks as f64 / hz)
}

#[test]
fn image_runs_as_the_daemonset_and_matches_getpeerinfo() {
    require_root();
    require_podman();
    let started = Instant::now();
    let pod = pod_spec();
    eprintln!("DaemonSet capabilities: {}", pod.caps.join(" "));
    let node = ContainerNode::start("image-node", Storage::Volume, &[]);
    let peer = Litecoind::start(None, &[format!("-connect={}", node.addr())]);
    node.wait_peers(1);

    let agent = AgentContainer::start(&pod, &pod.caps, &[], &target_config(&node));
    let agent_pid = agent.pid();
    let (_, cpu0) = rss_and_cpu(agent_pid);
    let t0 = Instant::now();
    // the one capability line: nothing missing
    let logs = agent.logs();
    let cap_lines: Vec<&str> = logs.lines().filter(|l| l.contains("capabilities:")).collect();
    assert_eq!(cap_lines.len(), 1, "one capability line:\n{logs}");
    assert!(cap_lines[0].contains("all that nodescope uses"), "{}", cap_lines[0]);
    // it entered the host's cgroup namespace from the pod's own
    let ns = |p: u32| std::fs::read_link(format!("/proc/{p}/ns/cgroup")).unwrap();
    assert_eq!(ns(agent_pid), ns(std::process::id()), "the agent is not in the host's cgroup namespace");

    let before = assert_peers_exact(&node, &agent);
    let sent_before = before.first().and_then(|p| p["bytessent"].as_u64()).unwrap_or(0);
    // traffic while it watches: blocks the peer downloads
    node.mine(30);
    let height: u64 = node.cli(&["getblockcount"]).parse().unwrap();
    wait_for("the host peer at the node's tip", Duration::from_secs(60), || {
        (peer.cli(&["getblockcount"]).parse::<u64>().ok() == Some(height)).then_some(())
    });
    let peers = assert_peers_exact(&node, &agent);
    assert_eq!(peers.len(), 1);
    // 30 blocks went out, as compact blocks (about 275 bytes each when empty) or whole ones
    let sent = peers[0]["bytessent"].as_u64().unwrap() - sent_before;
    assert!(sent >= 30 * 250, "the blocks went out: {sent} bytes since the first comparison: {peers:?}");

    // disk: the node's block files, through the filesystem hooks
    let m = wait_for("the node's file writes in /metrics", Duration::from_secs(30), || {
        let m = agent.metrics();
        (metric_sum(&m, "nodescope_file_written_bytes_total", &[("nodescope_target", "ltc")]) > 0.0).then_some(m)
    });
    // resources: open descriptors against /proc, data dir size against du
    let fds_seen = metric_sum(&m, "nodescope_process_open_fds", &[("nodescope_target", "ltc")]);
    let fds = std::fs::read_dir(format!("/proc/{}/fd", node.pid())).unwrap().count() as f64;
    assert!(fds_seen > 0.0 && (fds_seen - fds).abs() <= 8.0, "open fds {fds_seen}, /proc says {fds}");
    let mut last = (0.0, 0.0);
    let agreed = (0..60).any(|_| {
        std::thread::sleep(Duration::from_millis(500));
        let size = metric_sum(&agent.metrics(), "nodescope_datadir_size_bytes", &[("nodescope_target", "ltc")]);
        last = (size, du_sb(&node));
        last.1 > 0.0 && (size - last.1).abs() <= last.1 * 0.05
    });
    assert!(agreed, "data dir size {}, du -sb says {}", last.0, last.1);
    assert!(metric_sum(&m, "nodescope_filesystem_available_bytes", &[("nodescope_target", "ltc")]) > 0.0);
    let writable = wait_for("the data dir write test", Duration::from_secs(70), || {
        let m = agent.metrics();
        m.contains("nodescope_datadir_writable{")
            .then(|| metric_sum(&m, "nodescope_datadir_writable", &[("nodescope_target", "ltc")]))
    });
    assert_eq!(writable, 1.0);
    let (status, body) = wait_for("/health/ready", Duration::from_secs(60), || {
        agent.get("/health/ready").ok().filter(|(s, _)| *s == 200)
    });
    assert_eq!(status, 200, "{body}");
    let (status, _) = agent.get("/health/live").unwrap();
    assert_eq!(status, 200);

    // what the agent cost, against the DaemonSet's limits
    let (rss, cpu1) = rss_and_cpu(agent_pid);
    let cpu = (cpu1 - cpu0) / t0.elapsed().as_secs_f64();
    eprintln!(
        "agent: peak RSS {:.1} MiB (limit {} MiB), CPU {:.1} % of a core over {:.0} s at a 1 s interval (limit {} m)",
        rss as f64 / 1048576.0,
        pod.memory_limit >> 20,
        cpu * 100.0,
        t0.elapsed().as_secs_f64(),
        pod.cpu_limit_millis
    );
    assert!(rss < pod.memory_limit / 2, "peak RSS {rss} is over half the DaemonSet's memory limit");
    assert!(cpu * 1000.0 < pod.cpu_limit_millis as f64, "CPU {cpu} over the DaemonSet's limit");
    drop((agent, peer));
    eprintln!("image_runs_as_the_daemonset_and_matches_getpeerinfo: {:?}", started.elapsed());
}

/// `nodescope probes` in the image, with the DaemonSet's capabilities and
/// mounts, lists every hook the binary has and finds the kernel takes them.
#[test]
fn probes_in_the_image_report_every_hook() {
    require_root();
    require_podman();
    let pod = pod_spec();
    // the runtime stage's ENTRYPOINT and CMD: `nodescope run` by default
    let config = run_podman(&["image", "inspect", "-f", "{{json .Config}}", agent_image()]).unwrap();
    let config: Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["Entrypoint"], serde_json::json!(["/usr/local/bin/nodescope"]), "{config}");
    assert_eq!(config["Cmd"], serde_json::json!(["run"]), "{config}");
    assert_eq!(config["User"], "0:0", "{config}");
    let host = Command::new(BIN).args(["probes", "--json"]).output().unwrap();
    let host: Vec<Value> = serde_json::from_slice(&host.stdout).unwrap();
    let mut args: Vec<String> = vec![
        "run".into(),
        "--rm".into(),
        "--pull=never".into(),
        "--ulimit".into(),
        "nofile=1024:1024".into(),
        "--ulimit".into(),
        "nproc=1024:1024".into(),
        "--cap-drop=all".into(),
        format!("--cap-add={}", pod.caps.join(",")),
        "--read-only".into(),
        "--pid=host".into(),
    ];
    // (not the agent's own state: `probes` keeps none)
    for (h, inside, _) in pod.host_paths.iter().filter(|(_, inside, _)| !AGENT_STATE.contains(&inside.as_str())) {
        args.extend(["--volume".into(), format!("{h}:{inside}:ro")]);
    }
    args.extend([agent_image().to_string(), "probes".into(), "--json".into()]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = podman().args(&argv).output().unwrap();
    let inside: Vec<Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("probes --json in the image: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    let hooks = |v: &[Value]| -> Vec<(String, String)> {
        v.iter()
            .filter(|h| h["signal"] == "net" || h["signal"] == "disk" || h["signal"] == "disk-syscalls")
            // the disk coverage of each node found, not a hook
            .filter(|h| !h["hook"].as_str().unwrap_or("").starts_with("data dir of"))
            .map(|h| (h["signal"].as_str().unwrap().to_string(), h["hook"].as_str().unwrap().to_string()))
            .collect()
    };
    assert_eq!(hooks(&inside), hooks(&host), "the image's probes list other hooks than the host binary's");
    for h in &inside {
        if (h["signal"] == "net" || h["signal"] == "disk") && !h["hook"].as_str().unwrap().starts_with("data dir of") {
            assert_eq!(h["supported"], true, "in the image: {h}");
        }
    }
    eprintln!("{} hooks reported in the image", hooks(&inside).len());
}

#[test]
fn without_cap_sys_admin_it_says_so_in_one_line_and_serves_the_rest() {
    require_root();
    require_podman();
    let pod = pod_spec();
    let caps: Vec<String> = pod.caps.iter().filter(|c| *c != "CAP_SYS_ADMIN").cloned().collect();
    assert_eq!(caps.len() + 1, pod.caps.len(), "the DaemonSet grants CAP_SYS_ADMIN");
    let node = ContainerNode::start("image-nosysadmin", Storage::Volume, &[]);
    let _peer = Litecoind::start(None, &[format!("-connect={}", node.addr())]);
    node.wait_peers(1);
    let dir = TempDir::new("seccomp");
    let seccomp = containerd_like_seccomp(dir.path());
    let agent = AgentContainer::start(
        &pod,
        &caps,
        &["--security-opt".into(), format!("seccomp={}", seccomp.display())],
        &target_config(&node),
    );
    // disk and resources keep working; the node's peers, in a network
    // namespace the agent cannot enter, are what is missing
    node.mine(5);
    let m = wait_for("disk and resource figures", Duration::from_secs(60), || {
        let m = agent.metrics();
        (metric_sum(&m, "nodescope_file_written_bytes_total", &[("nodescope_target", "ltc")]) > 0.0
            && metric_sum(&m, "nodescope_datadir_size_bytes", &[("nodescope_target", "ltc")]) > 0.0)
            .then_some(m)
    });
    assert!(metric_sum(&m, "nodescope_process_open_fds", &[("nodescope_target", "ltc")]) > 0.0);
    let logs = agent.logs();
    let cap_lines: Vec<&str> = logs.lines().filter(|l| l.contains("capabilities:")).collect();
    eprintln!("{}", cap_lines.join("\n"));
    assert_eq!(cap_lines.len(), 1, "one capability line:\n{logs}");
    assert!(
        cap_lines[0].contains("without CAP_SYS_ADMIN: the TCP iterator in other network namespaces"),
        "{}",
        cap_lines[0]
    );
    assert_eq!(cap_lines[0].matches("without CAP_").count(), 1, "only CAP_SYS_ADMIN is missing: {}", cap_lines[0]);
    assert_eq!(node.peers().len(), 1);
    let ours = agent.peers("ltc");
    assert_eq!(ours.as_ref().map(Vec::len), Some(0), "peers without CAP_SYS_ADMIN: {ours:?}");
    let (status, _) = agent.get("/health/live").unwrap();
    assert_eq!(status, 200);
}

/// A litecoind in a container running as nobody, its data dir a directory
/// of nobody's (mode 0700) bind-mounted at /data: files only its user may
/// read. Its handle drops before the directory.
fn node_as_nobody(dir: &TempDir) -> ContainerNode {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut cmd = vec![NODE_BIN.to_string()];
    cmd.extend(container_regtest_args());
    let opts: Vec<String> =
        vec!["--user".into(), "65534:65534".into(), "--volume".into(), format!("{}:/data", dir.path().display())];
    let node = ContainerNode { c: Container::run("image-nobody", Storage::Overlay, &opts, &cmd) };
    node.wait_rpc();
    node
}

/// What the agent reports of the node with `caps`: (open fds, data dir
/// size, data dir writable), each None when absent, read once the write
/// test has run; and its one capability line.
type Figures = (Option<f64>, Option<f64>, Option<f64>, String);

fn resource_figures(pod: &PodSpec, caps: &[String], node: &ContainerNode) -> Figures {
    let agent = AgentContainer::start(pod, caps, &[], &target_config(node));
    let m = wait_for("the data dir write test", Duration::from_secs(70), || {
        let m = agent.metrics();
        m.contains("nodescope_datadir_writable{").then_some(m)
    });
    // a few more collections, for the data dir walk
    std::thread::sleep(Duration::from_secs(3));
    let m2 = agent.metrics();
    let figure = |m: &str, name: &str| {
        m.lines()
            .any(|l| l.starts_with(&format!("{name}{{")) && l.contains("nodescope_target=\"ltc\""))
            .then(|| metric_sum(m, name, &[("nodescope_target", "ltc")]))
    };
    let logs = agent.logs();
    let cap_lines: Vec<&str> = logs.lines().filter(|l| l.contains("capabilities:")).collect();
    assert_eq!(cap_lines.len(), 1, "one capability line:\n{logs}");
    let out = (
        figure(&m2, "nodescope_process_open_fds"),
        figure(&m2, "nodescope_datadir_size_bytes"),
        figure(&m, "nodescope_datadir_writable"),
        cap_lines[0].to_string(),
    );
    eprintln!("caps {}: open fds {:?}, data dir size {:?}, writable {:?}", caps.join(","), out.0, out.1, out.2);
    out
}

/// Each of CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH and CAP_SETUID/CAP_SETGID is
/// needed for a node that runs as another user: with the DaemonSet's set
/// every figure is there and right; without one, the figure it serves is
/// missing or wrong, and the capability line names it.
#[test]
fn each_file_capability_is_needed_for_a_node_of_another_user() {
    require_root();
    require_podman();
    let pod = pod_spec();
    let data = TempDir::new("nobody-data");
    let node = node_as_nobody(&data);
    let uid = std::fs::read_to_string(format!("/proc/{}/status", node.pid())).unwrap();
    assert!(uid.lines().any(|l| l.starts_with("Uid:\t65534\t")), "the node does not run as nobody");
    let without = |drop: &[&str]| -> Vec<String> {
        let caps: Vec<String> = pod.caps.iter().filter(|c| !drop.contains(&c.as_str())).cloned().collect();
        assert_eq!(caps.len() + drop.len(), pod.caps.len(), "the DaemonSet grants {drop:?}");
        caps
    };

    let (fds, size, writable, line) = resource_figures(&pod, &pod.caps, &node);
    assert!(line.contains("capabilities: all that nodescope uses"), "{line}");
    let real_fds = std::fs::read_dir(format!("/proc/{}/fd", node.pid())).unwrap().count() as f64;
    assert!(fds.is_some_and(|f| (f - real_fds).abs() <= 8.0), "open fds {fds:?}, /proc says {real_fds}");
    let du = du_sb(&node);
    assert!(size.is_some_and(|s| du > 0.0 && (s - du).abs() <= du * 0.05), "data dir size {size:?}, du -sb {du}");
    assert_eq!(writable, Some(1.0), "the data dir is writable to its user");

    // the node's /proc entries: a process of another user
    let (fds, _, _, line) = resource_figures(&pod, &without(&["CAP_SYS_PTRACE"]), &node);
    assert_eq!(fds, None, "open fds read without CAP_SYS_PTRACE");
    assert!(line.contains("without CAP_SYS_PTRACE: ") && line.matches("without CAP_").count() == 1, "{line}");
    // its 0700 data dir, and its /proc/PID/fd (mode 0500, its owner's):
    // read only with CAP_DAC_READ_SEARCH
    let (fds, size, _, line) = resource_figures(&pod, &without(&["CAP_DAC_READ_SEARCH"]), &node);
    assert!(line.contains("without CAP_DAC_READ_SEARCH: ") && line.matches("without CAP_").count() == 1, "{line}");
    assert!(size.is_none_or(|s| s < du * 0.5), "data dir size {size:?} without CAP_DAC_READ_SEARCH (du {du})");
    assert_eq!(fds, None, "open fds read without CAP_DAC_READ_SEARCH");
    // the write test as its user
    let (_, _, writable, line) = resource_figures(&pod, &without(&["CAP_SETUID", "CAP_SETGID"]), &node);
    assert!(line.contains("without CAP_SETUID") && line.contains("CAP_SETGID"), "{line}");
    assert_eq!(writable, Some(0.0), "as root without CAP_DAC_OVERRIDE, nobody's 0700 data dir is not writable");
}

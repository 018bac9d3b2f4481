//! Real podman containers for the "nodes in containers" tests: a `FROM
//! scratch` image built from the host's own litecoind, litecoin-cli, du and df
//! (with the loader and every library ldd lists), containers started with the
//! flags this host needs (runc, cgroupfs, no raised rlimits), and a litecoind
//! inside one, with its data dir in the container's own mount namespace.
//!
//! Every container is removed by id when its handle drops (pass or fail),
//! with the volume it made; each carries the label `nodescope-test=<pid of the
//! test process>` so one left by a killed test run can be found by hand.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

use super::{cgroup2_mount, require_tool, unique, wait_for, TempDir};

/// The litecoind inside the image, as its command line names it (the Debian
/// `/usr/bin/litecoind` is a shell wrapper around this binary).
const LITECOIND: &str = "/usr/lib/litecoin/litecoind";
/// P2P and RPC ports inside every container: each has its own network
/// namespace, so every node listens on the same ones.
pub const P2P_PORT: u16 = 19444;
pub const RPC_PORT: u16 = 19443;
/// Where the image holds it: its comm is `litecoind`, as on a host.
pub const NODE_BIN: &str = "/usr/bin/litecoind";
pub const IMAGE_REPO: &str = "localhost/nodescope-test-litecoind";

/// `podman` with the global flags this host needs: crun refuses hybrid
/// cgroups, and there is no systemd to manage them.
pub fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    c
}

pub fn run_podman(args: &[&str]) -> Result<String, String> {
    let out = podman().args(args).output().map_err(|e| format!("podman {args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "podman {args:?} exited with {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn podman_ok(args: &[&str]) -> String {
    run_podman(args).unwrap_or_else(|e| panic!("{e}"))
}

pub fn require_podman() {
    require_tool("podman", "podman");
    require_tool("runc", "runc");
    require_tool("litecoind", "litecoind");
    assert!(Path::new(LITECOIND).is_file(), "{LITECOIND} missing (Debian package litecoind)");
}

/// The libraries `ldd` lists for `bin`, and the loader, as absolute paths.
fn libraries(bin: &str) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(bin).output().unwrap_or_else(|e| panic!("ldd {bin}: {e}"));
    assert!(out.status.success(), "ldd {bin}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => l,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

fn which(tool: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{tool} not found on PATH"))
}

/// The test image: built once per test process, and not at all when a
/// previous run already built it from the same binaries.
pub fn image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(build_image)
}

fn build_image() -> String {
    require_podman();
    // (binary on the host, its path in the image)
    let bins: Vec<(PathBuf, &str)> = vec![
        (PathBuf::from(LITECOIND), NODE_BIN),
        (which("litecoin-cli"), "usr/bin/litecoin-cli"),
        (which("du"), "usr/bin/du"),
        (which("df"), "usr/bin/df"),
    ];
    let mut libs: Vec<PathBuf> = bins.iter().flat_map(|(b, _)| libraries(b.to_str().unwrap())).collect();
    libs.sort();
    libs.dedup();
    let containerfile = "FROM scratch\nCOPY rootfs/ /\nUSER 0:0\nWORKDIR /\n";

    // The tag names the exact bytes in the image: the binaries, the
    // libraries (their paths and contents) and the Containerfile.
    let mut hashed: Vec<String> = bins.iter().map(|(b, _)| b.display().to_string()).collect();
    hashed.extend(libs.iter().map(|l| l.display().to_string()));
    let sums = Command::new("sha256sum").args(&hashed).output().expect("sha256sum (coreutils)");
    assert!(sums.status.success(), "sha256sum: {}", String::from_utf8_lossy(&sums.stderr));
    let mut manifest = String::from_utf8_lossy(&sums.stdout).to_string();
    manifest += containerfile;
    let tag = format!("{IMAGE_REPO}:{}", &sha256_hex(manifest.as_bytes())[..16]);
    if podman().args(["image", "exists", &tag]).status().map(|s| s.success()).unwrap_or(false) {
        return tag;
    }

    let ctx = TempDir::new("image");
    let root = ctx.path().join("rootfs");
    let place = |host: &Path, inside: &str| {
        let dest = root.join(inside.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        // follows symlinks: the image holds the files themselves
        std::fs::copy(host, &dest).unwrap_or_else(|e| panic!("copy {} -> {}: {e}", host.display(), dest.display()));
    };
    for (b, inside) in &bins {
        place(b, inside);
    }
    for l in &libs {
        place(l, l.to_str().unwrap());
    }
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/nonexistent\nnobody:x:65534:65534:nobody:/nonexistent:/nonexistent\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    for (dir, mode) in [("tmp", 0o1777), ("data", 0o755), ("root", 0o700)] {
        let d = root.join(dir);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::fs::write(ctx.path().join("Containerfile"), containerfile).unwrap();
    let ctx_dir = ctx.path().to_str().unwrap().to_string();
    let file = format!("{ctx_dir}/Containerfile");
    podman_ok(&["build", "-q", "--pull=never", "-t", &tag, "-f", &file, &ctx_dir]);
    tag
}

fn sha256_hex(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}

/// Where the node's data dir (`/data`) lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// The container's own overlay root: kept across restarts of the container.
    Overlay,
    /// A podman volume this container makes (and removes when dropped).
    Volume,
    /// A tmpfs of this many MiB, mounted in the container's mount namespace
    /// only (no host path at all), empty again after each start. Nothing else
    /// writes to it, so its statvfs figures hold still while the node is quiet.
    Tmpfs(u32),
}

/// One podman container, removed by id (with the volume it made) when dropped.
pub struct Container {
    pub id: String,
    pub name: String,
    volume: Option<String>,
}

impl Container {
    /// `podman run -d` of the test image: `opts` are more `podman run`
    /// options, `cmd` the command and its arguments.
    pub fn run(name: &str, storage: Storage, opts: &[String], cmd: &[String]) -> Container {
        let image = image();
        let name = unique(&format!("nodescope-test-{name}"));
        let label = format!("nodescope-test={}", std::process::id());
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--name".into(),
            name.clone(),
            "--label".into(),
            label,
            "--pull=never".into(),
            "--ulimit".into(),
            "nofile=1024:1024".into(),
            "--ulimit".into(),
            "nproc=1024:1024".into(),
        ];
        let volume = match storage {
            Storage::Overlay => None,
            Storage::Volume => {
                let v = format!("{name}-data");
                podman_ok(&["volume", "create", "--label", &format!("nodescope-test={}", std::process::id()), &v]);
                args.extend(["--volume".into(), format!("{v}:/data")]);
                Some(v)
            }
            Storage::Tmpfs(mib) => {
                args.extend([
                    "--mount".into(),
                    format!("type=tmpfs,destination=/data,tmpfs-size={mib}m,tmpfs-mode=755"),
                ]);
                None
            }
        };
        args.extend_from_slice(opts);
        args.push(image.to_string());
        args.extend_from_slice(cmd);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let id = match run_podman(&argv) {
            Ok(id) => id,
            Err(e) => {
                // a failed run may still have created the container and the volume
                let _ = run_podman(&["rm", "-f", "-t", "0", "-v", &name]);
                if let Some(v) = &volume {
                    let _ = run_podman(&["volume", "rm", "-f", v]);
                }
                panic!("{e}");
            }
        };
        let id = id.lines().last().unwrap_or_default().to_string();
        assert_eq!(id.len(), 64, "podman run printed no container id: {id:?}");
        Container { id, name, volume }
    }

    fn inspect(&self, format: &str) -> String {
        podman_ok(&["inspect", "--type", "container", "-f", format, &self.id])
    }

    pub fn status(&self) -> String {
        self.inspect("{{.State.Status}}")
    }

    pub fn is_running(&self) -> bool {
        self.status() == "running"
    }

    /// The host pid of the container's first process (the node).
    pub fn pid(&self) -> u32 {
        let pid: u32 = self.inspect("{{.State.Pid}}").parse().unwrap_or(0);
        assert!(pid > 0, "container {} has no running process: {}\n{}", self.name, self.status(), self.logs());
        pid
    }

    /// Its address on the podman bridge (a new one after each start).
    pub fn ip(&self) -> String {
        let ip = self.inspect("{{.NetworkSettings.IPAddress}}");
        assert!(!ip.is_empty(), "container {} has no IP address", self.name);
        ip
    }

    /// The bridge's address, which the container sees host connections come from.
    pub fn gateway(&self) -> String {
        self.inspect("{{.NetworkSettings.Gateway}}")
    }

    /// The container's cgroup2 directory on the host (the node's `0::` line
    /// of /proc/PID/cgroup under the cgroup2 mount).
    pub fn cgroup2_dir(&self) -> PathBuf {
        let pid = self.pid();
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let rel = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or_else(|| panic!("no cgroup2 line in /proc/{pid}/cgroup: {text}"));
        let dir = cgroup2_mount().join(rel.trim_start_matches('/'));
        assert!(dir.is_dir(), "{} is not a directory", dir.display());
        dir
    }

    pub fn logs(&self) -> String {
        podman()
            .args(["logs", &self.id])
            .output()
            .map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
            .unwrap_or_default()
    }

    /// Runs a command inside the container.
    pub fn exec(&self, cmd: &[&str]) -> Output {
        podman().arg("exec").arg(&self.id).args(cmd).output().unwrap_or_else(|e| panic!("podman exec {cmd:?}: {e}"))
    }

    pub fn exec_ok(&self, cmd: &[&str]) -> String {
        let out = self.exec(cmd);
        assert!(out.status.success(), "podman exec {} {cmd:?}: {}", self.name, String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// SIGKILL to the node's host pid, then waits until podman saw it exit.
    pub fn kill9(&self) {
        let pid = self.pid();
        // SAFETY: signalling the pid podman reports for this container.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0, "kill -9 {pid}");
        wait_for(&format!("container {} to exit", self.name), Duration::from_secs(30), || {
            (!self.is_running()).then_some(())
        });
    }

    /// `podman start` of a stopped container (new pid, network namespace and
    /// maybe IP address).
    pub fn start(&self) {
        podman_ok(&["start", &self.id]);
    }

    /// `podman restart`: the node is stopped (SIGTERM, then SIGKILL after 10 s) and started again.
    pub fn restart(&self) {
        podman_ok(&["restart", &self.id]);
    }
}

impl Container {
    /// The last lines of the node's debug.log, read through its root from the host.
    fn debug_log_tail(&self) -> String {
        let pid: u32 = run_podman(&["inspect", "--type", "container", "-f", "{{.State.Pid}}", &self.id])
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if pid == 0 {
            return "(not running)".into();
        }
        let text = std::fs::read_to_string(format!("/proc/{pid}/root/data/regtest/debug.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- container {} ({}): output ---\n{}\n--- its debug.log ---\n{}",
                self.name,
                self.id,
                self.logs(),
                self.debug_log_tail()
            );
        }
        if let Err(e) = run_podman(&["rm", "-f", "-t", "0", "-v", &self.id]) {
            eprintln!("removing container {}: {e}", self.id);
        }
        if let Some(v) = &self.volume {
            if let Err(e) = run_podman(&["volume", "rm", "-f", v]) {
                eprintln!("removing volume {v}: {e}");
            }
        }
    }
}

/// The arguments of a regtest litecoind in a container: the harness's own
/// regtest arguments with the data dir at /data, the container's fixed ports,
/// listening and answering RPC on every address of its network namespace, and
/// no outbound connections of its own.
pub fn container_regtest_args() -> Vec<String> {
    let mut args: Vec<String> = super::regtest_args(Path::new("/data"), P2P_PORT, RPC_PORT)
        .into_iter()
        .filter(|a| !a.starts_with("-bind=") && !a.starts_with("-rpcbind=") && !a.starts_with("-rpcallowip="))
        .collect();
    args.extend([
        "-bind=0.0.0.0".into(),
        "-rpcbind=0.0.0.0".into(),
        "-rpcallowip=0.0.0.0/0".into(),
        "-connect=0".into(),
    ]);
    args
}

/// A litecoind regtest node in its own container.
pub struct ContainerNode {
    pub c: Container,
}

impl ContainerNode {
    pub fn start(name: &str, storage: Storage, extra: &[String]) -> ContainerNode {
        let mut cmd = vec![NODE_BIN.to_string()];
        cmd.extend(container_regtest_args());
        cmd.extend_from_slice(extra);
        let node = ContainerNode { c: Container::run(name, storage, &[], &cmd) };
        node.wait_rpc();
        node
    }

    pub fn wait_rpc(&self) {
        wait_for(&format!("litecoind RPC in container {}", self.c.name), Duration::from_secs(60), || {
            assert!(self.c.is_running(), "container {} stopped: {}", self.c.name, self.c.logs());
            self.try_cli(&["getblockcount"]).ok()
        });
    }

    pub fn pid(&self) -> u32 {
        self.c.pid()
    }

    pub fn ip(&self) -> String {
        self.c.ip()
    }

    /// Its P2P address as host processes reach it.
    pub fn addr(&self) -> String {
        format!("{}:{P2P_PORT}", self.ip())
    }

    /// RPC with the host's litecoin-cli over the bridge.
    pub fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        super::regtest_cli(&self.ip(), RPC_PORT, args)
    }

    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args).unwrap_or_else(|e| panic!("litecoin-cli {args:?} on container {}: {e}", self.c.name))
    }

    pub fn cli_json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.cli(args)).unwrap()
    }

    pub fn peers(&self) -> Vec<Value> {
        self.cli_json(&["getpeerinfo"]).as_array().unwrap().clone()
    }

    /// A receiving address of the node's wallet (made on first use).
    pub fn address(&self) -> String {
        if self.try_cli(&["getwalletinfo"]).is_err() {
            // after a restart the wallet exists on disk but is not loaded
            if self.try_cli(&["loadwallet", "w"]).is_err() {
                self.cli(&["createwallet", "w"]);
            }
        }
        self.cli(&["getnewaddress"])
    }

    pub fn mine(&self, blocks: u32) {
        let addr = self.address();
        self.cli(&["generatetoaddress", &blocks.to_string(), &addr]);
    }

    /// Waits for `n` peers that finished the version handshake.
    pub fn wait_peers(&self, n: usize) {
        wait_for(&format!("{n} peers on container {}", self.c.name), Duration::from_secs(60), || {
            (self.peers().iter().filter(|p| p["version"].as_u64().unwrap_or(0) > 0).count() == n).then_some(())
        });
    }

    /// SIGKILL to the node's host pid, then `podman start`, then waits for RPC.
    pub fn kill9_and_start(&self) {
        self.c.kill9();
        self.c.start();
        self.wait_rpc();
    }
}

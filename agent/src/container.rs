//! Which container a node runs in, and the name an operator knows it by.
//!
//! The container id comes from the node's cgroup path, where every runtime
//! puts it: `libpod-<id>` (podman), `docker-<id>.scope` and `/docker/<id>`
//! (docker), `cri-containerd-<id>.scope` (containerd), `crio-<id>.scope`
//! (CRI-O), and a bare `<id>` under `kubepods` (kubelet's cgroupfs driver).
//! The name is the runtime's own when its state files say it (podman's
//! `containers.json`, docker's `config.v2.json`); else, in a Kubernetes pod,
//! the pod's hostname, which is the pod's name; else the id's first 12
//! characters, as `podman ps` and `docker ps` show it. All three survive a
//! restart of the container (`podman restart` keeps id and name), so a node
//! keeps its target name, its slot and its series across one.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::cgroup::ProcessCgroups;
use crate::discovery;

/// Every runtime above names containers by 64 hex digits.
const ID_LEN: usize = 64;
/// The id prefix the runtimes' own tools show.
const SHORT_ID_LEN: usize = 12;
pub use crate::config::MAX_CONTAINER_NAME_LEN as MAX_NAME_LEN;
/// podman's container list when it runs as root.
const PODMAN_CONTAINERS: &str = "var/lib/containers/storage/overlay-containers/containers.json";
/// docker's per-container state: `<id>/config.v2.json`.
const DOCKER_CONTAINERS: &str = "var/lib/docker/containers";
/// kubelet mounts the pod's hostname here in every container of the pod.
const HOSTNAME: &str = "/etc/hostname";
/// A hostname is at most 253 bytes; more is not a hostname file.
const HOSTNAME_MAX_BYTES: u64 = 256;

/// The runtime that made a container, as its cgroup path says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Podman,
    Docker,
    Containerd,
    Crio,
    /// A bare id, as kubelet's cgroupfs driver names containers.
    Unnamed,
}

/// Cgroup directory names that hold a container id, by prefix.
const PREFIXES: [(&str, Runtime); 4] = [
    ("libpod-", Runtime::Podman),
    ("docker-", Runtime::Docker),
    ("cri-containerd-", Runtime::Containerd),
    ("crio-", Runtime::Crio),
];

/// A process's container, as its cgroup path names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerId {
    pub runtime: Runtime,
    /// 64 lowercase hex digits.
    pub id: String,
    /// The path is under kubelet's `kubepods` groups.
    pub kubernetes: bool,
}

impl ContainerId {
    /// The container of a cgroup path as /proc/PID/cgroup prints it. The
    /// innermost match wins: a runtime may put the container's processes in
    /// a child group of the container's (`libpod-<id>.scope/container`).
    /// Conmon's own groups (`libpod-conmon-<id>.scope`) are not containers
    /// and do not match.
    pub fn parse(cgroup_path: &str) -> Option<ContainerId> {
        let kubernetes = cgroup_path.contains("kubepods");
        let parts: Vec<&str> = cgroup_path.split('/').filter(|p| !p.is_empty()).collect();
        (0..parts.len()).rev().find_map(|i| {
            let stem = parts[i].strip_suffix(".scope").unwrap_or(parts[i]);
            let (runtime, id) = PREFIXES
                .iter()
                .find_map(|(prefix, runtime)| Some((*runtime, stem.strip_prefix(prefix)?)))
                .or_else(|| match i.checked_sub(1).map(|p| parts[p]) {
                    Some("docker") => Some((Runtime::Docker, stem)),
                    _ if kubernetes => Some((Runtime::Unnamed, stem)),
                    _ => None,
                })?;
            is_container_id(id).then(|| ContainerId { runtime, id: id.to_owned(), kubernetes })
        })
    }

    /// The container of a process, from its cgroup lines (any hierarchy:
    /// v1-only hosts have no cgroup2 line); None when it runs in none.
    pub fn of_process(proc_root: &Path, pid: u32) -> Option<ContainerId> {
        let groups = ProcessCgroups::read(proc_root, pid).ok()?;
        groups.v2.iter().chain(groups.v1.values()).find_map(|path| ContainerId::parse(path))
    }

    /// The name an operator knows the container by (see the module
    /// comment); `pid` is one of its processes, for the pod's hostname.
    pub fn name(&self, proc_root: &Path, pid: u32) -> String {
        self.runtime_name(proc_root)
            .or_else(|| self.kubernetes.then(|| pod_hostname(proc_root, pid)).flatten())
            .unwrap_or_else(|| self.id[..SHORT_ID_LEN].to_owned())
    }

    /// The name the runtime gave the container, from its state files.
    fn runtime_name(&self, proc_root: &Path) -> Option<String> {
        let name = state_roots(proc_root).iter().find_map(|root| match self.runtime {
            Runtime::Podman => podman_name(&root.join(PODMAN_CONTAINERS), &self.id),
            Runtime::Docker => docker_name(&root.join(DOCKER_CONTAINERS).join(&self.id).join("config.v2.json")),
            Runtime::Containerd | Runtime::Crio | Runtime::Unnamed => None,
        })?;
        label_safe(&name)
    }
}

/// A node's container, with the name discovery gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    pub name: String,
}

impl Container {
    pub fn of_process(proc_root: &Path, pid: u32) -> Option<Container> {
        let id = ContainerId::of_process(proc_root, pid)?;
        Some(Container { name: id.name(proc_root, pid), id: id.id })
    }
}

/// The first of `pids` whose container is `wanted`, by name or id prefix.
/// Names are looked up once per container, and only for containers whose id
/// does not match already.
pub fn find_in(proc_root: &Path, pids: impl IntoIterator<Item = u32>, wanted: &str) -> Option<u32> {
    let mut names: HashMap<String, String> = HashMap::new();
    pids.into_iter().find(|&pid| {
        let Some(c) = ContainerId::of_process(proc_root, pid) else {
            return false;
        };
        c.id.starts_with(wanted) || *names.entry(c.id.clone()).or_insert_with(|| c.name(proc_root, pid)) == wanted
    })
}

/// The processes of a group and of every group below it, sorted: a
/// Kubernetes pod's group holds none itself, its containers' groups do.
pub fn procs_below(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        pids.extend(crate::cgroup::procs(&d).unwrap_or_default());
        // Only directories are groups; cgroup2 makes no symlinks.
        let subgroups = fs::read_dir(&d).into_iter().flatten().flatten();
        pending.extend(subgroups.filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

fn is_container_id(s: &str) -> bool {
    s.len() == ID_LEN && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Where runtime state files are looked for: the agent's own filesystem (an
/// agent on the host), then the host's through pid 1's root (an agent in a
/// container that shares the host's pid namespace).
fn state_roots(proc_root: &Path) -> [PathBuf; 2] {
    [PathBuf::from("/"), proc_root.join("1").join("root")]
}

#[derive(Deserialize)]
struct PodmanContainer {
    id: String,
    #[serde(default)]
    names: Vec<String>,
}

fn podman_name(containers_json: &Path, id: &str) -> Option<String> {
    let list: Vec<PodmanContainer> = serde_json::from_slice(&fs::read(containers_json).ok()?).ok()?;
    list.into_iter().find(|c| c.id == id)?.names.into_iter().next()
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(rename = "Name")]
    name: String,
}

fn docker_name(config_v2: &Path) -> Option<String> {
    let config: DockerConfig = serde_json::from_slice(&fs::read(config_v2).ok()?).ok()?;
    // docker keeps the name with a leading '/'
    Some(config.name.trim_start_matches('/').to_owned())
}

/// The pod's hostname, from the container's own /etc/hostname. The file is
/// the container's to write, so it is read inside the container's root and
/// only as a short regular file.
fn pod_hostname(proc_root: &Path, pid: u32) -> Option<String> {
    let root = proc_root.join(pid.to_string()).join("root");
    let raw = discovery::read_node_file(Some(&root), Path::new(HOSTNAME), HOSTNAME_MAX_BYTES).ok()?;
    label_safe(String::from_utf8_lossy(&raw).trim())
}

/// A name fit for a target name and a label value: letters, digits, '-',
/// '_' and '.' (the runtimes allow no others, but their files are not
/// checked here), at most `MAX_NAME_LEN` characters; None when empty.
fn label_safe(name: &str) -> Option<String> {
    let safe: String = name
        .chars()
        .take(MAX_NAME_LEN)
        .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' })
        .collect();
    (!safe.is_empty()).then_some(safe)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const ID: &str = "5e301f86b9bec8667c3cdf4bce66d307e55c2d593192449ccae5443a1994d4ba";

    fn id(runtime: Runtime, kubernetes: bool) -> Option<ContainerId> {
        Some(ContainerId { runtime, id: ID.into(), kubernetes })
    }

    #[test]
    fn cgroup_paths_of_every_runtime() {
        let cases = [
            // podman, cgroupfs manager (as on the build hosts) and systemd manager
            (format!("/libpod_parent/libpod-{ID}"), id(Runtime::Podman, false)),
            (format!("/machine.slice/libpod-{ID}.scope"), id(Runtime::Podman, false)),
            (format!("/machine.slice/libpod-{ID}.scope/container"), id(Runtime::Podman, false)),
            // docker, systemd and cgroupfs drivers
            (format!("/system.slice/docker-{ID}.scope"), id(Runtime::Docker, false)),
            (format!("/docker/{ID}"), id(Runtime::Docker, false)),
            // Kubernetes: containerd and CRI-O with the systemd driver, kubelet's cgroupfs driver
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice/cri-containerd-{ID}.scope"),
                id(Runtime::Containerd, true),
            ),
            (format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podx.slice/crio-{ID}.scope"), id(Runtime::Crio, true)),
            (format!("/kubepods/burstable/pod0a1b2c3d-4e5f-6789-abcd-ef0123456789/{ID}"), id(Runtime::Unnamed, true)),
            // seen from the agent's own cgroup namespace
            (format!("/../../kubepods-burstable-podx.slice/cri-containerd-{ID}.scope"), id(Runtime::Containerd, true)),
        ];
        for (path, want) in cases {
            assert_eq!(ContainerId::parse(&path), want, "{path}");
        }
    }

    #[test]
    fn not_containers() {
        for path in [
            "/".to_string(),
            "/user.slice/user-0.slice/session-3.scope".into(),
            "/system.slice/litecoind.service".into(),
            format!("/machine.slice/libpod-conmon-{ID}.scope"),
            format!("/system.slice/crio-conmon-{ID}.scope"),
            // not 64 hex digits
            format!("/docker/{}", &ID[..12]),
            format!("/system.slice/docker-{}.scope", ID.to_uppercase()),
            "/system.slice/docker.service".into(),
            // a bare id means a container only under docker or kubepods
            format!("/nodes/{ID}"),
            // the pod's own group
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b.slice".into(),
        ] {
            assert_eq!(ContainerId::parse(&path), None, "{path}");
        }
    }

    /// A fake procfs root with pid 1's root (the host's files) beside it.
    struct FakeHost {
        root: PathBuf,
    }

    impl FakeHost {
        fn new(tag: &str) -> FakeHost {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let root = std::env::temp_dir().join(format!("nodescope-container-{}-{n}-{tag}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(root.join("proc/1/root")).unwrap();
            FakeHost { root }
        }

        fn proc_root(&self) -> PathBuf {
            self.root.join("proc")
        }

        fn write(&self, rel: &str, contents: &str) {
            let path = self.root.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, contents).unwrap();
        }

        fn process(&self, pid: u32, cgroup: &str) {
            self.write(&format!("proc/{pid}/cgroup"), &format!("0::{cgroup}\n"));
            fs::create_dir_all(self.root.join(format!("proc/{pid}/root"))).unwrap();
        }
    }

    impl Drop for FakeHost {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    #[test]
    fn names_from_runtime_files_hostname_or_id() {
        let host = FakeHost::new("names");
        let proc_root = host.proc_root();
        // podman
        host.process(10, &format!("/libpod_parent/libpod-{ID}"));
        host.write(
            &format!("proc/1/root/{PODMAN_CONTAINERS}"),
            &format!(
                r#"[{{"id":"{}","names":["other"]}},{{"id":"{ID}","names":["ltc-node","alias"],"image":"x"}}]"#,
                "a".repeat(64)
            ),
        );
        assert_eq!(Container::of_process(&proc_root, 10), Some(Container { id: ID.into(), name: "ltc-node".into() }));

        // docker, v1-only host
        let docker_id = "b".repeat(64);
        host.write("proc/11/cgroup", &format!("12:memory:/docker/{docker_id}\n1:name=systemd:/docker/{docker_id}\n"));
        host.write(
            &format!("proc/1/root/{DOCKER_CONTAINERS}/{docker_id}/config.v2.json"),
            r#"{"ID":"b","Name":"/btc main"}"#,
        );
        assert_eq!(Container::of_process(&proc_root, 11).unwrap().name, "btc_main");

        // Kubernetes: the pod's hostname; unless the runtime names it
        let pod_id = "c".repeat(64);
        host.process(12, &format!("/kubepods.slice/kubepods-pod1.slice/cri-containerd-{pod_id}.scope"));
        host.write("proc/12/root/etc/hostname", "litecoin-0\n");
        assert_eq!(Container::of_process(&proc_root, 12).unwrap().name, "litecoin-0");

        // no runtime files and not in a pod: the short id
        let bare_id = "d".repeat(64);
        host.process(13, &format!("/machine.slice/libpod-{bare_id}.scope"));
        host.write("proc/13/root/etc/hostname", "ignored\n");
        assert_eq!(Container::of_process(&proc_root, 13).unwrap().name, "d".repeat(12));

        // a pod whose hostname file is unusable
        let odd_id = "e".repeat(64);
        host.process(14, &format!("/kubepods/besteffort/pod1/{odd_id}"));
        fs::create_dir_all(host.root.join("proc/14/root/etc/hostname")).unwrap();
        assert_eq!(Container::of_process(&proc_root, 14).unwrap().name, "e".repeat(12));

        // not in a container
        host.process(15, "/system.slice/bitcoind.service");
        assert_eq!(Container::of_process(&proc_root, 15), None);
        assert_eq!(Container::of_process(&proc_root, 16), None);
    }

    #[test]
    fn finds_a_process_by_container_name_or_id_prefix() {
        let host = FakeHost::new("find");
        let proc_root = host.proc_root();
        host.process(20, "/system.slice/litecoind.service");
        host.process(21, &format!("/libpod_parent/libpod-{ID}"));
        host.write(&format!("proc/1/root/{PODMAN_CONTAINERS}"), &format!(r#"[{{"id":"{ID}","names":["ltc"]}}]"#));
        assert_eq!(find_in(&proc_root, [20, 21], "ltc"), Some(21));
        assert_eq!(find_in(&proc_root, [20, 21], "5e301f86"), Some(21));
        assert_eq!(find_in(&proc_root, [20, 21], "ltc2"), None);
        assert_eq!(find_in(&proc_root, [20], "ltc"), None);
    }

    #[test]
    fn processes_below_a_pod_group() {
        let host = FakeHost::new("below");
        let pod = host.root.join("cg/kubepods-pod1.slice");
        host.write("cg/kubepods-pod1.slice/cgroup.procs", "");
        host.write(&format!("cg/kubepods-pod1.slice/cri-containerd-{ID}.scope/cgroup.procs"), "40\n41\n");
        host.write("cg/kubepods-pod1.slice/cri-containerd-pause.scope/cgroup.procs", "7\n");
        host.write("cg/kubepods-pod1.slice/cri-containerd-pause.scope/cgroup.type", "domain\n");
        assert_eq!(procs_below(&pod), vec![7, 40, 41]);
        assert_eq!(procs_below(&host.root.join("cg/none")), Vec::<u32>::new());
    }

    #[test]
    fn label_safe_names() {
        assert_eq!(label_safe("ltc-node_1.a").as_deref(), Some("ltc-node_1.a"));
        assert_eq!(label_safe("a b/c:d").as_deref(), Some("a_b_c_d"));
        assert_eq!(label_safe(&"x".repeat(100)).map(|s| s.len()), Some(MAX_NAME_LEN));
        assert_eq!(label_safe(""), None);
    }
}

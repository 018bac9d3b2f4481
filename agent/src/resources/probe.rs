//! `nodescope probes` rows for the resource signal's sources: the cgroup
//! hierarchies and controllers, statvfs of the data dirs, procfs.

use std::path::{Path, PathBuf};

use super::cgroup_stats::{self, CONTROLLERS};
use crate::bpf::HookStatus;
use crate::cgroup::Mounts;
use crate::config::Config;
use crate::target::Targets;

const SIGNAL: &str = "resources";

fn row(hook: String, supported: bool, detail: String) -> HookStatus {
    HookStatus { signal: SIGNAL, hook, program: "-", supported, detail }
}

pub fn probe_sources() -> Vec<HookStatus> {
    let mut rows = Vec::new();
    let mounts = match Mounts::read() {
        Ok(m) => m,
        Err(e) => {
            rows.push(row("cgroup mounts".into(), false, format!("/proc/self/mountinfo: {e}")));
            Mounts::default()
        }
    };
    let v2_controllers = cgroup_stats::v2_controllers(&mounts);
    rows.push(match &mounts.v2 {
        Some(m) => row(
            "cgroup2 mount".into(),
            true,
            format!(
                "{} (controllers: {})",
                m.display(),
                if v2_controllers.is_empty() { "none".into() } else { v2_controllers.join(" ") }
            ),
        ),
        None => row("cgroup2 mount".into(), false, "not mounted: figures come from cgroup v1 only".into()),
    });

    // A figure is readable when its controller is on either hierarchy.
    for (v1, v2) in CONTROLLERS {
        let hook = format!("cgroup {v1} controller");
        let on_v2 = v2_controllers.iter().any(|c| c == v2);
        let r = match (on_v2, mounts.v1.get(*v1), &mounts.v2) {
            (true, _, Some(m)) => row(hook, true, format!("cgroup2 at {}", m.display())),
            (false, Some(p), _) => row(hook, true, format!("cgroup v1 at {}", p.display())),
            // CPU time is in every cgroup2 group's cpu.stat, controller or not.
            (false, None, Some(m)) if *v1 == "cpuacct" => {
                row(hook, true, format!("cgroup2 cpu.stat usage_usec at {}", m.display()))
            }
            _ => row(hook, false, format!("on neither hierarchy: the {} figures are off", figures(v1))),
        };
        rows.push(r);
    }

    // The nodes discovery finds, resolved as the agent resolves them: a data
    // dir in a container is reached through the node's root.
    let nodes = Targets::new(&Config::default(), mounts.clone()).refresh().to_vec();
    let dirs: Vec<(&str, PathBuf, PathBuf)> =
        nodes.iter().filter_map(|t| Some((t.name.as_str(), t.datadir.clone()?, t.host_datadir()?))).collect();
    if dirs.is_empty() {
        let r = super::filesystem::statvfs(Path::new("/"));
        rows.push(row(
            "statvfs data dirs".into(),
            r.is_ok(),
            match r {
                Ok(_) => "no node found on this host; statvfs(/) works".into(),
                Err(e) => format!("statvfs(/): {e}"),
            },
        ));
    }
    for (name, dir, at) in dirs {
        let r = super::filesystem::statvfs(&at);
        // A data dir that is not there (a node whose files were removed under
        // it) says nothing of what the agent can do: only a refusal does.
        let (works, detail) = match r {
            Ok(fs) => (true, format!("{} bytes available", fs.available_bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (true, format!("{e}: the node's data dir is not there; its figures are unknown until it is"))
            }
            Err(e) => (false, e.to_string()),
        };
        // the path as the node names it; two containers may name the same one
        rows.push(row(format!("statvfs {} ({name})", dir.display()), works, detail));
    }

    // Another process's io, limits and fd need ptrace read access: the
    // agent must hold every capability the node holds, or CAP_SYS_PTRACE.
    // Tried on the nodes found here, else on the agent's own process.
    let pids: Vec<String> = match nodes.iter().filter_map(|t| t.pid).map(|p| p.to_string()).collect::<Vec<_>>() {
        found if found.is_empty() => vec!["self".into()],
        found => found,
    };
    for pid in pids {
        let unreadable: Vec<String> = ["stat", "status", "io", "limits", "fd"]
            .iter()
            .filter_map(|f| {
                let p = Path::new("/proc").join(&pid).join(f);
                let r = if *f == "fd" { std::fs::read_dir(&p).map(drop) } else { std::fs::read(&p).map(drop) };
                r.err().map(|e| format!("{}: {e}", p.display()))
            })
            .collect();
        let detail = match (unreadable.is_empty(), pid.as_str()) {
            (true, "self") => "stat, status, io, limits, fd (of the agent itself: no node found to try)".to_string(),
            (true, _) => format!("stat, status, io, limits, fd of node process {pid}"),
            (false, _) => unreadable.join("; "),
        };
        rows.push(row(format!("/proc/{pid} readable"), unreadable.is_empty(), detail));
    }
    rows
}

fn figures(controller: &str) -> &'static str {
    match controller {
        "cpu" => "CPU throttling",
        "cpuacct" => "CPU time",
        "memory" => "memory",
        "blkio" => "block I/O",
        _ => "task count",
    }
}

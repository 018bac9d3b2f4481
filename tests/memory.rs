//! `memory_high` judges the working set (usage less inactive file pages),
//! as kubelet's eviction does, not usage with the page cache in it: a
//! memory-limited group whose process reads a file larger than its limit
//! fills the limit with cache and stays ok; anonymous memory past 80 % of
//! the limit fires the rule. The group's own files are the outside truth.
//! This host has the memory controller on cgroup v1; on a host whose
//! cgroup2 root offers it, the same test runs on cgroup2.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use common::*;

const LIMIT: u64 = 128 << 20;
const FILE: u64 = 384 << 20;

/// Reads a file or holds anonymous memory on command.
const HOG: &str = r#"
import sys
held = []
print("ready", flush=True)
for line in sys.stdin:
    cmd, arg = line.split()
    if cmd == "read":
        with open(arg, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass
    elif cmd == "alloc":
        held.append(bytearray(b"\x01") * int(arg))
    print("done", flush=True)
"#;

/// The group's memory files, whichever hierarchy holds the controller.
struct MemoryGroup {
    dir: PathBuf,
    v1: bool,
}

impl MemoryGroup {
    fn new() -> Option<MemoryGroup> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let v1_mount = info.lines().find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let post: Vec<&str> = post.split(' ').collect();
            (post[0] == "cgroup" && post[2].split(',').any(|o| o == "memory"))
                .then(|| PathBuf::from(pre.split(' ').nth(4).unwrap()))
        });
        let name = format!("nodescope-test-{}-mem", std::process::id());
        if let Some(mount) = v1_mount {
            // a child of the test's own memory group, so its limits still apply
            let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
            let path = own
                .lines()
                .find_map(|l| {
                    let mut p = l.splitn(3, ':');
                    let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
                    ctrls.split(',').any(|c| c == "memory").then(|| path.to_string())
                })
                .unwrap_or_else(|| "/".into());
            let dir = mount.join(path.trim_start_matches('/')).join(name);
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("memory.limit_in_bytes"), LIMIT.to_string()).unwrap();
            return Some(MemoryGroup { dir, v1: true });
        }
        let root = cgroup2_mount();
        let offered = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        if !offered.split_whitespace().any(|c| c == "memory") {
            return None;
        }
        let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory");
        let dir = root.join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("memory.max"), LIMIT.to_string()).unwrap();
        Some(MemoryGroup { dir, v1: false })
    }

    fn usage(&self) -> u64 {
        let f = if self.v1 { "memory.usage_in_bytes" } else { "memory.current" };
        std::fs::read_to_string(self.dir.join(f)).unwrap().trim().parse().unwrap()
    }

    fn inactive_file(&self) -> u64 {
        let key = if self.v1 { "total_inactive_file" } else { "inactive_file" };
        let stat = std::fs::read_to_string(self.dir.join("memory.stat")).unwrap();
        stat.lines().find_map(|l| l.strip_prefix(key)?.trim().parse().ok()).unwrap()
    }
}

impl Drop for MemoryGroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove {}", self.dir.display());
    }
}

struct Hog {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Hog {
    fn start(group: &MemoryGroup) -> Hog {
        require_tool("python3", "python3");
        let procs = group.dir.join("cgroup.procs");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("echo $$ > '{}' && exec python3 -c \"$0\"", procs.display()))
            .arg(HOG)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut hog = Hog { child, stdin, lines };
        hog.expect("ready");
        hog
    }

    fn expect(&mut self, what: &str) {
        match self.lines.recv_timeout(Duration::from_secs(60)) {
            Ok(l) if l == what => {}
            other => panic!("hog: expected {what:?}, got {other:?}"),
        }
    }

    fn cmd(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.expect("done");
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5));
    }
}

/// A file of `size` bytes on disk, not in the page cache: the hog's reads
/// charge every page of it to the hog's group.
fn uncached_file(path: &Path, size: u64) {
    use std::os::unix::io::AsRawFd;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![7u8; 1 << 20];
    for _ in 0..size / chunk.len() as u64 {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    // SAFETY: advising the kernel about a descriptor this test owns.
    assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
}

fn rule_state(agent: &Agent) -> (String, serde_json::Value) {
    try_rule_state(agent).expect("no memory_high rule in /health/detailed")
}

fn try_rule_state(agent: &Agent) -> Option<(String, serde_json::Value)> {
    let v = agent.json("/health/detailed");
    let r = v["targets"][0]["rules"].as_array()?.iter().find(|r| r["id"] == "memory_high").cloned()?;
    Some((r["state"].as_str()?.to_string(), r["evidence"].clone()))
}

#[test]
fn page_cache_past_the_limit_is_not_memory_high_and_anonymous_memory_is() {
    require_root();
    let Some(group) = MemoryGroup::new() else {
        eprintln!("checked: nothing: no memory controller on cgroup v1 or on the cgroup2 root");
        return;
    };
    let scratch = TempDir::new("mem-file");
    let file = scratch.path().join("big");
    uncached_file(&file, FILE);
    let mut hog = Hog::start(&group);
    let pid_file = scratch.path().join("hog.pid");
    std::fs::write(&pid_file, format!("{}\n", hog.child.id())).unwrap();
    let agent = Agent::start(&format!(
        "[agent]\ninterval = \"250ms\"\n\n[[targets]]\nname = \"hog\"\npid_file = \"{}\"\n\n\
         [targets.rules.memory_high]\nfor = \"1s\"\nclear_after = \"1s\"\n",
        pid_file.display()
    ));
    let state = wait_for("memory_high evaluated", Duration::from_secs(20), || {
        let (s, _) = try_rule_state(&agent)?;
        (s != "unknown").then_some(s)
    });
    assert_eq!(state, "ok");

    // page cache: three times the limit read through
    hog.cmd(&format!("read {}", file.display()));
    let (usage, inactive) = (group.usage(), group.inactive_file());
    eprintln!(
        "after reading {} MiB: usage {} MiB of {} MiB, inactive file {} MiB",
        FILE >> 20,
        usage >> 20,
        LIMIT >> 20,
        inactive >> 20
    );
    assert!(usage * 100 > LIMIT * 80, "the page cache did not fill the group: usage {usage} of {LIMIT}");
    assert!((usage - inactive) * 100 < LIMIT * 50, "working set {} of {LIMIT}", usage - inactive);
    // the agent's figures equal the files, and the rule stays ok past its `for`
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let (s, ev) = rule_state(&agent);
        assert_eq!(s, "ok", "memory_high on page cache: {ev}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let (_, ev) = rule_state(&agent);
    let seen = ev["memory_working_set_bytes"].as_f64().unwrap();
    let now = (group.usage() - group.inactive_file()) as f64;
    assert!((seen - now).abs() < (4 << 20) as f64, "working set: nodescope {seen}, files {now}");
    assert!(ev["used_percent"].as_f64().unwrap() < 50.0, "{ev}");

    // anonymous memory: 100 MiB held, with the interpreter past 80 % of 128 MiB
    hog.cmd(&format!("alloc {}", 100u64 << 20));
    let (usage, inactive) = (group.usage(), group.inactive_file());
    eprintln!("after holding 100 MiB: usage {} MiB, inactive file {} MiB", usage >> 20, inactive >> 20);
    assert!((usage - inactive) * 100 > LIMIT * 80, "working set {} of {LIMIT}", usage - inactive);
    let started = Instant::now();
    let ev = wait_for("memory_high firing", Duration::from_secs(10), || {
        let (s, ev) = rule_state(&agent);
        (s == "firing").then_some(ev)
    });
    eprintln!("memory_high firing after {:?}: {ev}", started.elapsed());
    assert!(ev["used_percent"].as_f64().unwrap() > 80.0, "{ev}");
    drop(hog);
}

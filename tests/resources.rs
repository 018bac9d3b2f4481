//! The resource signal against outside truth: the data dir's filesystem
//! against `df` and `stat -f`, its size against `du -sb`, the forecast
//! against a writer of known rate; the cgroup figures against the cgroup's
//! own files, in whichever hierarchies the host has (v1 controllers on a
//! hybrid host, cgroup2 with or without controllers), each test saying which;
//! process figures against /proc and the limits the test sets.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// These tests measure CPU time and disk space: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------- helpers

fn of(agent: &Agent, name: &str, target: &str) -> Option<f64> {
    series(&agent.metrics(), name, &[("nodescope_target", target)])
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A process the test starts, stopped by pid when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        stop_child(&mut self.0, Duration::from_secs(5));
    }
}

fn write_pid_file(path: &Path, pid: u32) {
    std::fs::write(path, format!("{pid}\n")).unwrap();
}

/// Polls until `check` returns Ok, failing with its last complaint.
fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(()) => return,
            Err(e) if Instant::now() >= deadline => panic!("{what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

// ------------------------------------------------------- disk usage (1)

/// A small ext4 filesystem in an image file, loop-mounted for one test;
/// unmounted (which frees the loop device) and removed when dropped.
struct LoopFs {
    mnt: PathBuf,
    _dir: TempDir,
}

impl LoopFs {
    fn new(megabytes: u64) -> LoopFs {
        let dir = TempDir::new("loopfs");
        let image = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        std::fs::File::create(&image).unwrap().set_len(megabytes << 20).unwrap();
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
        run(Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&mnt));
        LoopFs { mnt, _dir: dir }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        for _ in 0..50 {
            if Command::new("umount").arg(&self.mnt).status().is_ok_and(|s| s.success()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // still busy: detach it so the image can go
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Df {
    size: u64,
    used: u64,
    avail: u64,
}

fn df(path: &Path) -> Df {
    let out = run(Command::new("df").args(["-B1", "--output=size,used,avail"]).arg(path));
    let v: Vec<u64> = out.lines().nth(1).unwrap().split_whitespace().map(|x| x.parse().unwrap()).collect();
    Df { size: v[0], used: v[1], avail: v[2] }
}

/// `stat -f`: fundamental block size, free blocks, total and free inodes.
fn stat_f(path: &Path) -> [u64; 4] {
    let out = run(Command::new("stat").args(["-f", "-c", "%S %f %c %d"]).arg(path));
    let v: Vec<u64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
    [v[0], v[1], v[2], v[3]]
}

fn du_sb(path: &Path) -> u64 {
    run(Command::new("du").arg("-sb").arg(path)).split_whitespace().next().unwrap().parse().unwrap()
}

/// Appends `chunk` bytes every `every` to a file, `count` times, fsyncing
/// each; stops early when dropped.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(path: PathBuf, chunk: usize, every: Duration, count: u32) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            for i in 0..count {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
                f.write_all(&vec![0x5au8; chunk]).unwrap();
                f.sync_all().unwrap();
                drop(f);
                // paced against the start, so slow fsyncs do not lower the rate
                let next = start + every * (i + 1);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        });
        Writer { stop, thread: Some(thread) }
    }

    fn finish(mut self) {
        self.thread.take().unwrap().join().unwrap();
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn disk_usage_matches_df_and_du_and_forecast_follows_a_writer() {
    let _serial = serial();
    require_root();
    for (tool, package) in [
        ("mkfs.ext4", "e2fsprogs"),
        ("mount", "mount"),
        ("df", "coreutils"),
        ("du", "coreutils"),
        ("sleep", "coreutils"),
    ] {
        require_tool(tool, package);
    }
    let fs = LoopFs::new(128);
    let datadir = fs.mnt.join("node");
    // a node-like tree: many small files (so the first walk takes several
    // bounded passes), a hard link (counted once), a symlink (its own size)
    for i in 0..150 {
        let p = datadir.join(format!("chainstate/{:06}.ldb", i));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, vec![1u8; 1000 + i * 37]).unwrap();
    }
    for i in 0..40 {
        let p = datadir.join(format!("blocks/index/{:06}.ldb", i));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, vec![2u8; 3000 + i]).unwrap();
    }
    std::fs::hard_link(datadir.join("chainstate/000001.ldb"), datadir.join("chainstate/link.ldb")).unwrap();
    std::os::unix::fs::symlink("../chainstate/000002.ldb", datadir.join("blocks/sym")).unwrap();

    // fill to 96% as df counts it: used / (used + available)
    let d = df(&fs.mnt);
    let want_used = (d.used + d.avail) * 96 / 100;
    let mut fill = std::fs::File::create(datadir.join("blocks/blk00000.dat")).unwrap();
    let mut left = want_used.saturating_sub(d.used);
    let block = vec![0xa5u8; 1 << 20];
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        fill.write_all(&block[..n]).unwrap();
        left -= n as u64;
    }
    fill.sync_all().unwrap();
    drop(fill);
    let d = df(&fs.mnt);
    let pct = d.used as f64 * 100.0 / (d.used + d.avail) as f64;
    assert!((95.0..97.0).contains(&pct), "filled to {pct:.2}% instead of 96%");
    eprintln!("filesystem filled to {pct:.2}%: {d:?}");

    let node = Proc(Command::new("sleep").arg("600").spawn().unwrap());
    let pid_file = fs.mnt.join("node.pid");
    write_pid_file(&pid_file, node.0.id());
    let started = Instant::now();
    let agent = Agent::start(&format!(
        "[agent]\ninterval = \"250ms\"\n\n[resources]\ndatadir_ops_per_interval = 16\nforecast_window = \"4s\"\n\
         # the write test would move free inodes and blocks under df's feet\ndatadir_write_test = \"1h\"\n\n\
         [[targets]]\nname = \"disk\"\npid_file = \"{}\"\ndatadir = \"{}\"\n",
        pid_file.display(),
        datadir.display()
    ));

    // The size appears once the bounded first walk (about 200 entries at
    // 16 operations per 250 ms pass) is complete.
    eventually("nodescope_datadir_size_bytes", Duration::from_secs(30), || {
        of(&agent, "nodescope_datadir_size_bytes", "disk").map(drop).ok_or_else(|| "absent".into())
    });
    eprintln!("first walk complete after {:?}", started.elapsed());

    // The filesystem is quiet now: df before and after the scrape agree, and
    // nodescope must agree with them to within one block.
    let [bsize, free_blocks, inodes, free_inodes] = stat_f(&fs.mnt);
    eventually("filesystem figures equal df's", Duration::from_secs(10), || {
        let before = df(&fs.mnt);
        let text = agent.metrics();
        if df(&fs.mnt) != before {
            return Err("df moved during the scrape".into());
        }
        let get =
            |n: &str| series(&text, n, &[("nodescope_target", "disk")]).ok_or(format!("{n} absent")).map(|v| v as u64);
        let (size, free, avail) = (
            get("nodescope_filesystem_size_bytes")?,
            get("nodescope_filesystem_free_bytes")?,
            get("nodescope_filesystem_available_bytes")?,
        );
        eprintln!(
            "size {size} (df {}), free {free} (df size-used {}, stat -f {}), available {avail} (df {})",
            before.size,
            before.size - before.used,
            free_blocks * bsize,
            before.avail
        );
        for (what, ours, theirs) in
            [("size", size, before.size), ("free", free, before.size - before.used), ("available", avail, before.avail)]
        {
            if ours.abs_diff(theirs) > bsize {
                return Err(format!("{what}: nodescope {ours}, df {theirs}, block {bsize}"));
            }
        }
        let favail: u64 = run(Command::new("python3")
            .args(["-c", "import os,sys; print(os.statvfs(sys.argv[1]).f_favail)"])
            .arg(&fs.mnt))
        .trim()
        .parse()
        .unwrap();
        for (what, ours, theirs) in [
            ("inodes", get("nodescope_filesystem_inodes")?, inodes),
            ("free inodes", get("nodescope_filesystem_inodes_free")?, free_inodes),
            ("available inodes", get("nodescope_filesystem_inodes_available")?, favail),
        ] {
            if ours != theirs {
                return Err(format!("{what}: nodescope {ours}, stat -f / statvfs {theirs}"));
            }
        }
        Ok(())
    });

    // Within 1% is the requirement; on a quiet tree the figures should be
    // identical, and a difference shows in the output.
    let check_du = |when: &str| {
        eventually(&format!("data dir size equals du -sb ({when})"), Duration::from_secs(10), || {
            let ours = of(&agent, "nodescope_datadir_size_bytes", "disk").ok_or("absent")? as u64;
            let theirs = du_sb(&datadir);
            eprintln!("{when}: data dir size {ours}, du -sb {theirs}");
            if ours.abs_diff(theirs) as f64 > theirs as f64 * 0.01 {
                return Err(format!("nodescope {ours}, du -sb {theirs}"));
            }
            if ours != theirs {
                return Err(format!("nodescope {ours}, du -sb {theirs}: within 1% but not yet equal"));
            }
            Ok(())
        });
    };
    check_du("after the first walk");

    // Nothing writes: after a whole forecast window the filesystem is not
    // filling and there is no forecast.
    eventually("no forecast while nothing writes", Duration::from_secs(15), || {
        match of(&agent, "nodescope_datadir_days_until_full", "disk") {
            None => Ok(()),
            Some(v) => Err(format!("days_until_full {v} with no writer")),
        }
    });

    // A writer of known rate: 32 KiB every 250 ms = 128 KiB/s, 16 s.
    let rate = 32.0 * 1024.0 * 4.0;
    let writer = Writer::start(datadir.join("blocks/blk00001.dat"), 32 * 1024, Duration::from_millis(250), 64);
    let forecast_against_df = |label: &str| -> f64 {
        let text = agent.metrics();
        let avail = df(&fs.mnt).avail as f64;
        let days = series(&text, "nodescope_datadir_days_until_full", &[("nodescope_target", "disk")])
            .unwrap_or_else(|| panic!("{label}: no forecast while a writer fills the disk\n{}", agent.log()));
        let expected = avail / rate / 86400.0;
        let growth =
            series(&text, "nodescope_datadir_growth_bytes_per_second", &[("nodescope_target", "disk")]).unwrap_or(0.0);
        let fs_growth = series(&text, "nodescope_filesystem_growth_bytes_per_second", &[("nodescope_target", "disk")])
            .unwrap_or(0.0);
        eprintln!("{label}: days_until_full {days:.6} (df available / writer rate = {expected:.6}), data dir growth {growth:.0} B/s, filesystem growth {fs_growth:.0} B/s (writer {rate} B/s)");
        assert!(
            days > expected * 0.5 && days < expected * 2.0,
            "{label}: forecast {days} days, df and the writer say {expected}"
        );
        assert!(growth > rate * 0.5 && growth < rate * 1.5, "{label}: data dir growth {growth} B/s, writer {rate} B/s");
        days
    };
    std::thread::sleep(Duration::from_secs(6));
    let early = forecast_against_df("6 s into the writer");
    std::thread::sleep(Duration::from_secs(7));
    let late = forecast_against_df("13 s into the writer");
    assert!(late < early, "forecast did not come closer as the disk filled: {early} then {late} days");
    writer.finish();

    // The appended file was followed without a new walk (rescan is 1h).
    check_du("after the writer");
}

// ------------------------------------------------------------ cgroups (2)
//
// Each test exercises the hierarchies this host has (from mountinfo, never
// assumed) and says which ones it checked: the v1 controllers of a hybrid
// host, and cgroup2 with whichever of the cpu, memory, io and pids
// controllers it carries (all of them on a pure cgroup2 host, none here).
// A figure whose file exists must equal it; one whose file does not must be
// absent, not zero.

/// The v1 controllers the signal reads.
const V1_CONTROLLERS: &[&str] = &["cpu", "cpuacct", "memory", "blkio", "pids"];
/// The cgroup2 controllers the signal reads.
const V2_CONTROLLERS: &[&str] = &["cpu", "memory", "io", "pids"];

/// The v1 hierarchies the signal reads, from mountinfo.
fn v1_mounts() -> Vec<(String, PathBuf)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut out = Vec::new();
    for line in info.lines() {
        let Some((pre, post)) = line.split_once(" - ") else { continue };
        let post: Vec<&str> = post.split(' ').collect();
        if post[0] != "cgroup" {
            continue;
        }
        let mnt = PathBuf::from(pre.split(' ').nth(4).unwrap());
        for opt in post[2].split(',') {
            if V1_CONTROLLERS.contains(&opt) {
                out.push((opt.to_string(), mnt.clone()));
            }
        }
    }
    out
}

/// The controllers the cgroup2 hierarchy offers (its root's cgroup.controllers).
fn v2_root_controllers() -> Vec<String> {
    let root = cgroup2_mount();
    let text = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    text.split_whitespace().map(str::to_owned).collect()
}

/// A child of the test's own group in each v1 hierarchy the host has (so
/// whatever limits the test runs under still apply), removed when dropped.
struct V1Groups {
    dirs: Vec<(String, PathBuf)>,
}

impl V1Groups {
    fn new() -> V1Groups {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let name = format!("nodescope-test-{}-v1", std::process::id());
        let mut dirs: Vec<(String, PathBuf)> = Vec::new();
        for (ctrl, mnt) in v1_mounts() {
            let path = own
                .lines()
                .find_map(|l| {
                    let mut p = l.splitn(3, ':');
                    let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
                    ctrls.split(',').any(|c| c == ctrl).then(|| path.to_string())
                })
                .unwrap_or_else(|| "/".into());
            let dir = mnt.join(path.trim_start_matches('/')).join(&name);
            // cpu and cpuacct may share one mount, and so one directory
            if !dirs.iter().any(|(_, d)| *d == dir) {
                std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
            }
            dirs.push((ctrl, dir));
        }
        V1Groups { dirs }
    }

    fn dir(&self, ctrl: &str) -> Option<PathBuf> {
        self.dirs.iter().find(|(c, _)| c == ctrl).map(|(_, d)| d.clone())
    }

    fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(_, d)| d.join("cgroup.procs")).collect()
    }
}

impl Drop for V1Groups {
    fn drop(&mut self) {
        for (_, dir) in &self.dirs {
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Turns on, in the cgroup2 root's cgroup.subtree_control, the controllers
/// the signal reads that the root offers and has not yet handed to its
/// children (a pure cgroup2 host under systemd already has). Returns what
/// could not be turned on, with why; the test's group then lacks their files.
fn enable_v2_controllers() -> Vec<String> {
    let root = cgroup2_mount();
    let offered = v2_root_controllers();
    let mut failed = Vec::new();
    for ctrl in V2_CONTROLLERS.iter().filter(|c| offered.iter().any(|o| o == *c)) {
        let enabled = std::fs::read_to_string(root.join("cgroup.subtree_control")).unwrap_or_default();
        if enabled.split_whitespace().any(|c| c == *ctrl) {
            continue;
        }
        if let Err(e) = std::fs::write(root.join("cgroup.subtree_control"), format!("+{ctrl}")) {
            failed.push(format!("{ctrl} ({}/cgroup.subtree_control: {e})", root.display()));
        }
    }
    failed
}

/// (metric name, labels, the value its file gives), for `settled`.
type Figures = Vec<(String, Vec<(String, String)>, f64)>;

/// One test group's files, whichever hierarchy holds them: each figure's
/// file is None when the group has no such file (controller not there).
struct GroupFiles {
    hierarchy: String,
    memory_usage: Option<PathBuf>,
    memory_limit: Option<PathBuf>,
    memory_peak: Option<PathBuf>,
    pids: Option<PathBuf>,
    /// the CPU usage file and its unit in nanoseconds (1 for v1's
    /// cpuacct.usage, 1000 for cgroup2's cpu.stat usage_usec)
    cpu_usage: Option<(PathBuf, &'static str, u64)>,
    /// the file that sets the quota, and cpu.stat with its throttled-time key and unit
    cpu_quota: Option<PathBuf>,
    cpu_throttle: Option<(PathBuf, &'static str, u64)>,
    /// v1 blkio (per-device Read/Write lines) or cgroup2 io.stat (key=value)
    io: Option<Io>,
}

enum Io {
    Blkio(PathBuf),
    Stat(PathBuf),
}

impl GroupFiles {
    fn v1(g: &V1Groups) -> GroupFiles {
        let file = |ctrl: &str, name: &str| g.dir(ctrl).map(|d| d.join(name)).filter(|p| p.exists());
        GroupFiles {
            hierarchy: format!(
                "cgroup v1 {}",
                g.dirs.iter().map(|(c, d)| format!("{c} at {}", d.display())).collect::<Vec<_>>().join(", ")
            ),
            memory_usage: file("memory", "memory.usage_in_bytes"),
            memory_limit: file("memory", "memory.limit_in_bytes"),
            memory_peak: file("memory", "memory.max_usage_in_bytes"),
            pids: file("pids", "pids.current"),
            cpu_usage: file("cpuacct", "cpuacct.usage").map(|p| (p, "", 1)),
            cpu_quota: file("cpu", "cpu.cfs_quota_us"),
            cpu_throttle: file("cpu", "cpu.stat").map(|p| (p, "throttled_time", 1)),
            io: g.dir("blkio").map(Io::Blkio),
        }
    }

    fn v2(dir: &Path) -> GroupFiles {
        let file = |name: &str| Some(dir.join(name)).filter(|p| p.exists());
        let stat = dir.join("cpu.stat");
        let has_key = |key: &str| std::fs::read_to_string(&stat).is_ok_and(|s| s.lines().any(|l| l.starts_with(key)));
        GroupFiles {
            hierarchy: format!("cgroup2 at {}", dir.display()),
            memory_usage: file("memory.current"),
            memory_limit: file("memory.max"),
            memory_peak: file("memory.peak"),
            pids: file("pids.current"),
            cpu_usage: has_key("usage_usec ").then(|| (stat.clone(), "usage_usec", 1000)),
            cpu_quota: file("cpu.max"),
            cpu_throttle: has_key("throttled_usec ").then(|| (stat.clone(), "throttled_usec", 1000)),
            io: file("io.stat").map(Io::Stat),
        }
    }

    /// What this group lets the test check, for the output.
    fn describe(&self) -> String {
        let mut has = Vec::new();
        let mut lacks = Vec::new();
        for (name, there) in [
            ("memory", self.memory_usage.is_some()),
            ("pids", self.pids.is_some()),
            ("cpu usage", self.cpu_usage.is_some()),
            ("cpu quota and throttling", self.cpu_quota.is_some() && self.cpu_throttle.is_some()),
            ("block I/O", self.io.is_some()),
        ] {
            if there {
                has.push(name)
            } else {
                lacks.push(name)
            }
        }
        format!(
            "{}: figures against the files for {}; absent as they must be for {}",
            self.hierarchy,
            if has.is_empty() { "none".into() } else { has.join(", ") },
            if lacks.is_empty() { "none".into() } else { lacks.join(", ") }
        )
    }

    fn cpu_usage_ns(&self) -> Option<u64> {
        let (path, key, ns) = self.cpu_usage.as_ref()?;
        let v = if key.is_empty() { read_u64(path) } else { key_of(path, key).unwrap() };
        Some(v * ns)
    }

    fn throttled(&self) -> Option<(f64, f64)> {
        let (path, key, ns) = self.cpu_throttle.as_ref()?;
        Some(((key_of(path, key).unwrap() * ns) as f64 / 1e9, key_of(path, "nr_throttled").unwrap() as f64))
    }

    /// memory.* and pids.current, as (metric, labels, value) for `settled`.
    fn memory_and_pids(&self) -> Figures {
        let mut out = Vec::new();
        let mut push = |name: &str, v: u64| out.push((name.to_string(), vec![], v as f64));
        if let Some(p) = &self.memory_usage {
            push("nodescope_cgroup_memory_usage_bytes", read_u64(p));
        }
        if let Some(p) = &self.memory_limit {
            // v2 says "max", v1 a huge number when unlimited; the test sets one
            if let Ok(v) = std::fs::read_to_string(p).unwrap().trim().parse::<u64>() {
                push("nodescope_cgroup_memory_limit_bytes", v);
            }
        }
        if let Some(p) = &self.memory_peak {
            push("nodescope_cgroup_memory_peak_bytes", read_u64(p));
        }
        if let Some(p) = &self.pids {
            push("nodescope_cgroup_pids", read_u64(p));
        }
        out
    }

    fn cpu(&self) -> Figures {
        let mut out = Vec::new();
        if let Some(ns) = self.cpu_usage_ns() {
            out.push(("nodescope_cgroup_cpu_time_seconds_total".to_string(), vec![], ns as f64 / 1e9));
        }
        if let Some((seconds, periods)) = self.throttled() {
            out.push(("nodescope_cgroup_cpu_throttled_seconds_total".to_string(), vec![], seconds));
            out.push(("nodescope_cgroup_cpu_throttled_periods_total".to_string(), vec![], periods));
        }
        out
    }

    fn io(&self) -> Figures {
        let labels = |dev: &str, dir: &str| {
            vec![("system_device".to_string(), dev.to_string()), ("disk_io_direction".to_string(), dir.to_string())]
        };
        let mut out = Vec::new();
        match &self.io {
            None => {}
            Some(Io::Blkio(dir)) => {
                let bytes = std::fs::read_to_string(dir.join("blkio.throttle.io_service_bytes_recursive")).unwrap();
                let ops = std::fs::read_to_string(dir.join("blkio.throttle.io_serviced_recursive")).unwrap();
                for (text, name) in
                    [(bytes, "nodescope_cgroup_io_bytes_total"), (ops, "nodescope_cgroup_io_operations_total")]
                {
                    for line in text.lines() {
                        let f: Vec<&str> = line.split_whitespace().collect();
                        if let [dev, op @ ("Read" | "Write"), v] = f[..] {
                            let dir = if op == "Read" { "read" } else { "write" };
                            out.push((name.to_string(), labels(dev, dir), v.parse::<f64>().unwrap()));
                        }
                    }
                }
            }
            Some(Io::Stat(path)) => {
                // MAJ:MIN rbytes=N wbytes=N rios=N wios=N dbytes=N dios=N
                for line in std::fs::read_to_string(path).unwrap().lines() {
                    let mut f = line.split_whitespace();
                    let Some(dev) = f.next() else { continue };
                    for kv in f {
                        let Some((k, v)) = kv.split_once('=') else { continue };
                        let (name, dir) = match k {
                            "rbytes" => ("nodescope_cgroup_io_bytes_total", "read"),
                            "wbytes" => ("nodescope_cgroup_io_bytes_total", "write"),
                            "rios" => ("nodescope_cgroup_io_operations_total", "read"),
                            "wios" => ("nodescope_cgroup_io_operations_total", "write"),
                            _ => continue,
                        };
                        out.push((name.to_string(), labels(dev, dir), v.parse::<f64>().unwrap()));
                    }
                }
            }
        }
        out
    }
}

/// Asserts no series of any of `metrics` exists for the target.
fn absent(agent: &Agent, target: &str, metrics: &[&str], why: &str) {
    let text = agent.metrics();
    let label = format!("nodescope_target=\"{target}\"");
    for metric in metrics {
        let found = text.lines().find(|l| {
            l.strip_prefix(metric).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                && l.contains(&label)
        });
        assert_eq!(found, None, "{metric} reported though {why}");
    }
}

/// Limits set through the group's own files: memory 768 MiB, CPU 20% of one
/// CPU (a spinning process is throttled), and on v1 a blkio throttle rule
/// no workload reaches on the scratch dir's disk (v1 blkio counts only on
/// devices that have one; cgroup2's io.stat counts every device).
fn set_limits(files: &GroupFiles, scratch: &Path) {
    let write = |path: &Path, value: &str| {
        std::fs::write(path, value).unwrap_or_else(|e| panic!("writing {value:?} to {}: {e}", path.display()))
    };
    if let Some(p) = &files.memory_limit {
        write(p, &(768u64 << 20).to_string());
    }
    if let Some(p) = &files.cpu_quota {
        if p.ends_with("cpu.max") {
            write(p, "20000 100000");
        } else {
            write(&p.with_file_name("cpu.cfs_period_us"), "100000");
            write(p, "20000");
        }
    }
    if let Some(Io::Blkio(dir)) = &files.io {
        let disk = disk_of(scratch);
        for f in ["blkio.throttle.read_bps_device", "blkio.throttle.write_bps_device"] {
            write(&dir.join(f), &format!("{disk} 1099511627776"));
        }
    }
}

/// The same workload against whichever group `files` describes, with the
/// hog already inside it and the agent watching it as `target`: limits set
/// through the group's own files, then memory, CPU and block I/O, each
/// figure equal to its file, or absent when the group has no such file.
/// Returns the lines of what was checked.
fn hog_workload(files: &GroupFiles, hog: &mut Hog, agent: &Agent, target: &str, scratch: &Path) -> Vec<String> {
    let mut checked = vec![files.describe()];
    set_limits(files, scratch);

    // memory and pids
    if files.memory_usage.is_some() {
        settled(agent, target, "memory and pids before the allocation", || files.memory_and_pids());
        if files.memory_limit.is_some() {
            assert_eq!(of(agent, "nodescope_cgroup_memory_limit_bytes", target), Some((768u64 << 20) as f64));
        }
        let before = of(agent, "nodescope_cgroup_memory_usage_bytes", target).unwrap();
        hog.cmd("alloc 200");
        settled(agent, target, "memory and pids after allocating 200 MiB", || files.memory_and_pids());
        let after = of(agent, "nodescope_cgroup_memory_usage_bytes", target).unwrap();
        let grown = (after - before) / (1 << 20) as f64;
        eprintln!("memory usage {before} -> {after}: +{grown:.1} MiB for a 200 MiB allocation");
        assert!((190.0..240.0).contains(&grown), "usage grew by {grown:.1} MiB for a 200 MiB allocation");
        if files.memory_peak.is_some() {
            assert!(of(agent, "nodescope_cgroup_memory_peak_bytes", target).unwrap() >= after);
        } else {
            // cgroup2 before Linux 5.19 has no memory.peak
            absent(agent, target, &["nodescope_cgroup_memory_peak_bytes"], "the group has no peak file");
        }
        checked.push(format!("memory: +{grown:.1} MiB for a 200 MiB allocation, equal to the files"));
    } else {
        if files.pids.is_some() {
            settled(agent, target, "pids", || files.memory_and_pids());
        }
        absent(
            agent,
            target,
            &[
                "nodescope_cgroup_memory_usage_bytes",
                "nodescope_cgroup_memory_limit_bytes",
                "nodescope_cgroup_memory_peak_bytes",
            ],
            "the group has no memory controller files",
        );
    }
    if files.pids.is_none() {
        absent(agent, target, &["nodescope_cgroup_pids"], "the group has no pids.current");
    }

    // CPU: usage always where the hierarchy has it; throttling with a quota
    // (1.5 s of spinning at 20%), else 0.4 s of the hog's own CPU time
    let throttling = files.cpu_quota.is_some() && files.cpu_throttle.is_some();
    let before = files.cpu_usage_ns();
    let work = if throttling { "spin 1.5" } else { "burn 0.4" };
    hog.cmd(work);
    settled(agent, target, &format!("CPU time and throttling after `{work}`"), || files.cpu());
    if let (Some(before), Some(now)) = (before, files.cpu_usage_ns()) {
        let spent = (now - before) as f64 / 1e9;
        eprintln!("{work}: {spent:.3} s of CPU");
        if throttling {
            // 0.3 s is the quota's share; less if other work holds the CPU
            assert!(spent > 0.1 && spent < 0.6, "1.5 s of spinning at a 20% quota used {spent} s of CPU");
        } else {
            assert!((0.39..1.0).contains(&spent), "the group's files say it used {spent} s for 0.4 s of CPU time");
        }
        checked.push(format!("cpu time: {spent:.3} s for `{work}`, equal to the files"));
    } else {
        absent(agent, target, &["nodescope_cgroup_cpu_time_seconds_total"], "the group has no CPU usage file");
    }
    if throttling {
        let throttled = of(agent, "nodescope_cgroup_cpu_throttled_periods_total", target).unwrap();
        assert!(throttled >= 5.0, "only {throttled} throttled periods in 1.5 s at a 20% quota");
        checked.push(format!("cpu quota 20%: {throttled} periods throttled, equal to the files"));
    } else {
        absent(
            agent,
            target,
            &["nodescope_cgroup_cpu_throttled_seconds_total", "nodescope_cgroup_cpu_throttled_periods_total"],
            "the group has no cpu controller files",
        );
    }

    // block I/O: direct writes and reads of 8 MiB
    if files.io.is_some() {
        let disk = disk_of(scratch);
        hog.cmd(&format!("io {} 8", scratch.join("direct.bin").display()));
        settled(agent, target, "block I/O per device after 8 MiB of direct I/O", || files.io());
        let labels = [("nodescope_target", target), ("system_device", disk.as_str()), ("disk_io_direction", "write")];
        let written = series(&agent.metrics(), "nodescope_cgroup_io_bytes_total", &labels).unwrap();
        assert!(written >= (8 << 20) as f64, "{written} bytes written on {disk} for 8 MiB of direct writes");
        checked.push(format!("block I/O: {written} bytes written on {disk}, equal to the files"));
    } else {
        absent(
            agent,
            target,
            &["nodescope_cgroup_io_bytes_total", "nodescope_cgroup_io_operations_total"],
            "the group has no block I/O files",
        );
    }
    let text = agent.metrics();
    assert!(!text.contains("nodescope_cgroup_io_bytes_bytes"), "doubled unit suffix in /metrics");
    checked
}

const HOG: &str = r#"
import os, subprocess, sys, time
held = []
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "alloc":
        # bytes * n fills with memset: every page is touched, so charged
        held.append(b"\x01" * (int(cmd[1]) << 20))
    elif cmd[0] == "spin":
        end = time.time() + float(cmd[1])
        while time.time() < end:
            pass
    elif cmd[0] == "burn":
        # this much CPU time, however long a busy machine takes to give it
        end = time.process_time() + float(cmd[1])
        while time.process_time() < end:
            pass
    elif cmd[0] == "io":
        path, mb = cmd[1], cmd[2]
        subprocess.run(["dd", "if=/dev/zero", "of=" + path, "bs=1M", "count=" + mb, "oflag=direct", "status=none"], check=True)
        subprocess.run(["dd", "if=" + path, "of=/dev/null", "bs=1M", "iflag=direct", "status=none"], check=True)
        os.unlink(path)
    print("done", flush=True)
"#;

/// A python3 process driven over stdin, started inside the given cgroup
/// directories (a shell joins them, then execs python3).
struct Hog {
    proc: Proc,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Hog {
    fn start(procs_files: &[PathBuf]) -> Hog {
        require_tool("python3", "python3");
        let joins: String = procs_files.iter().map(|f| format!("echo $$ > '{}' && ", f.display())).collect();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("{joins}exec python3 -c \"$0\""))
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
        let mut hog = Hog { proc: Proc(child), stdin, lines };
        hog.expect("ready");
        hog
    }

    fn pid(&self) -> u32 {
        self.proc.0.id()
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

fn read_u64(path: &Path) -> u64 {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).trim().parse().unwrap()
}

fn key_of(path: &Path, key: &str) -> Option<u64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits until the file figures hold still across a scrape and then
/// requires nodescope's to equal them: `read` gives (metric name, labels,
/// file value) triples.
fn settled(agent: &Agent, target: &str, what: &str, read: impl Fn() -> Figures) {
    eventually(&format!("{what} equal the cgroup files"), Duration::from_secs(15), || {
        let before = read();
        let text = agent.metrics();
        let after = read();
        if before != after {
            return Err(format!("files moved during the scrape: {before:?} -> {after:?}"));
        }
        for (name, labels, file) in &after {
            let mut l: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            l.push(("nodescope_target", target));
            let ours = series(&text, name, &l).ok_or(format!("{name}{l:?} absent"))?;
            // seconds are printed as f64: allow the last bits of the conversion
            if (ours - file).abs() > 1e-9 * file.abs().max(1.0) {
                return Err(format!("{name}{l:?}: nodescope {ours}, file {file}"));
            }
        }
        eprintln!("{what}: {:?}", after.iter().map(|(n, l, v)| format!("{n}{l:?}={v}")).collect::<Vec<_>>());
        Ok(())
    });
}

/// A directory for the direct I/O, under the clone's target/ (on a disk;
/// /tmp may be a tmpfs), removed when dropped.
fn scratch_on_disk(prefix: &str) -> TempDir {
    let dir = repo_root().join("target/tmp").join(format!("{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    TempDir(dir)
}

/// The whole disk a path is on, as "major:minor" (blkio rules take disks).
fn disk_of(path: &Path) -> String {
    let dev = std::fs::metadata(path).unwrap().dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    assert!(
        sys.exists(),
        "{} is not on a block device ({major}:{minor}): the blkio test needs one for direct I/O",
        path.display()
    );
    if sys.join("partition").exists() {
        std::fs::read_to_string(sys.join("../dev")).unwrap().trim().to_string()
    } else {
        format!("{major}:{minor}")
    }
}

#[test]
fn cgroup_v1_figures_equal_the_cgroup_files_and_follow_a_memory_hog() {
    let _serial = serial();
    require_root();
    require_tool("dd", "coreutils");
    if v1_mounts().is_empty() {
        eprintln!(
            "checked: nothing for cgroup v1: this host mounts no v1 hierarchy of {} (/proc/self/mountinfo); \
             cgroup_v2_figures_from_a_real_cgroup2_directory checks the cgroup2 controllers",
            V1_CONTROLLERS.join(", ")
        );
        return;
    }
    // auto picks v1 when the cgroup2 root offers none of the controllers read
    let v2_offers: Vec<String> =
        v2_root_controllers().into_iter().filter(|c| V2_CONTROLLERS.contains(&c.as_str())).collect();
    let (config, version) = if v2_offers.is_empty() {
        ("", "cgroup_version auto, which picks v1 on this host")
    } else {
        ("[resources]\ncgroup_version = \"v1\"\n\n", "cgroup_version = \"v1\"")
    };
    let v2 = Cgroup::new();
    let v1 = V1Groups::new();
    let files = GroupFiles::v1(&v1);
    let scratch = scratch_on_disk("hog-io");
    let mut procs = v1.procs_files();
    procs.push(v2.path.join("cgroup.procs"));
    let mut hog = Hog::start(&procs);
    let dir = TempDir::new("cg-agent");
    let pid_file = dir.path().join("hog.pid");
    write_pid_file(&pid_file, hog.pid());
    let agent = Agent::start(&format!(
        "[agent]\ninterval = \"250ms\"\n\n{config}[[targets]]\nname = \"hog\"\npid_file = \"{}\"\n",
        pid_file.display()
    ));
    let checked = hog_workload(&files, &mut hog, &agent, "hog", scratch.path());
    eprintln!("checked ({version}):\n  {}", checked.join("\n  "));
    drop(hog);
}

#[test]
fn cgroup_v2_figures_from_a_real_cgroup2_directory() {
    let _serial = serial();
    require_root();
    require_tool("dd", "coreutils");
    // A pure cgroup2 host offers the cpu, memory, io and pids controllers
    // here; a hybrid one (this host) binds them to v1, so a cgroup2 group has
    // cpu.stat's usage keys and none of the controller files. The controller
    // files' formats are also covered against a fake tree in cgroup_stats.rs.
    let offered = v2_root_controllers();
    let not_enabled = enable_v2_controllers();
    let v2 = Cgroup::new();
    let files = GroupFiles::v2(&v2.path);
    let scratch = scratch_on_disk("hog2-io");
    let mut hog = Hog::start(&[v2.path.join("cgroup.procs")]);
    let dir = TempDir::new("cg2-agent");
    let pid_file = dir.path().join("hog.pid");
    write_pid_file(&pid_file, hog.pid());
    let agent = Agent::start(&format!(
        "[agent]\ninterval = \"250ms\"\n\n[resources]\ncgroup_version = \"v2\"\n\n[[targets]]\nname = \"hog2\"\npid_file = \"{}\"\n",
        pid_file.display()
    ));
    let mut checked = hog_workload(&files, &mut hog, &agent, "hog2", scratch.path());

    // the process's figures are unaffected by the cgroup figures that are off
    let text = agent.metrics();
    assert!(series(&text, "nodescope_process_rss_bytes", &[("nodescope_target", "hog2")]).is_some());
    // A missing file is logged once, not every interval.
    if files.memory_usage.is_none() {
        std::thread::sleep(Duration::from_secs(1));
        let log = agent.log();
        assert_eq!(log.matches("memory.current").count(), 1, "memory.current should be logged once:\n{log}");
        checked.push("memory.current's absence logged once".into());
    }
    checked.push(format!(
        "the cgroup2 root offers [{}]{}",
        offered.join(" "),
        if not_enabled.is_empty() { String::new() } else { format!("; could not enable {}", not_enabled.join(", ")) }
    ));
    eprintln!("checked (cgroup_version = \"v2\"):\n  {}", checked.join("\n  "));
    drop(hog);
}

// ---------------------------------------------------------- process (3)

const FDS: &str = r#"
import os, sys, threading, time
fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(37)]
for _ in range(3):
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
with open(sys.argv[1], "wb") as f:
    f.write(b"\x07" * (1 << 20))
    f.flush()
    os.fsync(f.fileno())
print("ready", flush=True)
sys.stdin.readline()
"#;

/// The FDS script as an unprivileged user (nobody), with its data dir.
fn start_node(datadir: &Path) -> (Proc, u32) {
    // prlimit sets the limit on itself and execs: changing another user's
    // limits needs CAP_SYS_RESOURCE, which this host does not grant
    let mut child = Command::new("prlimit")
        .args([
            "--nofile=1234:4096",
            "--",
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            FDS,
        ])
        .arg(datadir.join("written.bin"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let pid = child.id();
    (Proc(child), pid)
}

fn proc_status(pid: u32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .unwrap()
}

#[test]
fn process_figures_equal_procs_own() {
    let _serial = serial();
    require_root();
    require_tool("setpriv", "util-linux");
    require_tool("prlimit", "util-linux");
    assert!(Path::new("/usr/bin/python3").exists(), "/usr/bin/python3 missing (Debian package python3)");
    let datadir = TempDir::new("proc-datadir");
    std::os::unix::fs::chown(datadir.path(), Some(65534), Some(65534)).unwrap();
    let (node, pid) = start_node(datadir.path());
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits.lines().any(|l| l.starts_with("Max open files") && l.split_whitespace().nth(3) == Some("1234")),
        "{limits}"
    );
    let dir = TempDir::new("proc-agent");
    let pid_file = dir.path().join("node.pid");
    write_pid_file(&pid_file, pid);
    let agent = Agent::start(&format!(
        "[agent]\ninterval = \"250ms\"\n\n[resources]\ndatadir_write_test = \"1s\"\n\n[[targets]]\nname = \"proc\"\npid_file = \"{}\"\ndatadir = \"{}\"\n",
        pid_file.display(),
        datadir.path().display()
    ));

    eventually("process figures equal /proc's", Duration::from_secs(15), || {
        let text = agent.metrics();
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as f64;
        let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
        let io_of =
            |k: &str| io.lines().find_map(|l| l.strip_prefix(k)?.strip_prefix(": ")?.parse::<f64>().ok()).unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let start_ticks: f64 = stat.rsplit_once(')').unwrap().1.split_whitespace().nth(19).unwrap().parse().unwrap();
        // SAFETY: no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let since_boot: f64 =
            std::fs::read_to_string("/proc/uptime").unwrap().split_whitespace().next().unwrap().parse().unwrap();
        let uptime = since_boot - start_ticks / hz;
        let t = [("nodescope_target", "proc")];
        let get = |n: &str, extra: &[(&str, &str)]| {
            let mut l = t.to_vec();
            l.extend_from_slice(extra);
            series(&text, n, &l).ok_or(format!("{n} absent"))
        };
        let exact = [
            ("open fds", get("nodescope_process_open_fds", &[])?, fds),
            ("fd limit", get("nodescope_process_fd_limit", &[])?, 1234.0),
            ("rss", get("nodescope_process_rss_bytes", &[])?, proc_status(pid, "VmRSS") as f64 * 1024.0),
            ("threads", get("nodescope_process_threads", &[])?, proc_status(pid, "Threads") as f64),
            (
                "read bytes",
                get("nodescope_process_io_bytes_total", &[("disk_io_direction", "read")])?,
                io_of("read_bytes"),
            ),
            (
                "write bytes",
                get("nodescope_process_io_bytes_total", &[("disk_io_direction", "write")])?,
                io_of("write_bytes"),
            ),
            ("restarts", get("nodescope_process_restarts_total", &[])?, 0.0),
        ];
        for (what, ours, theirs) in exact {
            if ours != theirs {
                return Err(format!("{what}: nodescope {ours}, /proc {theirs}"));
            }
        }
        let ours = get("nodescope_process_uptime_seconds", &[])?;
        if (ours - uptime).abs() > 1.5 {
            return Err(format!("uptime: nodescope {ours}, /proc {uptime}"));
        }
        eprintln!(
            "open fds {fds}, threads {}, write_bytes {}, uptime {ours:.2} (/proc {uptime:.2})",
            proc_status(pid, "Threads"),
            io_of("write_bytes")
        );
        Ok(())
    });
    // what the test made the process do shows through
    assert!(of(&agent, "nodescope_process_open_fds", "proc").unwrap() >= 40.0);
    assert!(of(&agent, "nodescope_process_threads", "proc").unwrap() >= 4.0);
    let written = series(
        &agent.metrics(),
        "nodescope_process_io_bytes_total",
        &[("nodescope_target", "proc"), ("disk_io_direction", "write")],
    );
    assert!(written.unwrap() >= (1 << 20) as f64, "the process wrote and fsynced 1 MiB; nodescope says {written:?}");

    // Writable as the node's user, not as root: read-only to nobody, the
    // data dir is not writable for the node though root could still write.
    let writable = |want: f64| {
        eventually(&format!("nodescope_datadir_writable = {want}"), Duration::from_secs(10), || {
            match of(&agent, "nodescope_datadir_writable", "proc") {
                Some(v) if v == want => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
    };
    writable(1.0);
    std::fs::set_permissions(datadir.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
    let denied = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "touch"])
        .arg(datadir.path().join("probe"))
        .status()
        .unwrap();
    assert!(!denied.success(), "nobody could still write to the data dir: the check below proves nothing");
    writable(0.0);
    std::fs::set_permissions(datadir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    writable(1.0);

    // A restart: the same target, a new process.
    drop(node);
    let (_node, new_pid) = start_node(datadir.path());
    write_pid_file(&pid_file, new_pid);
    eventually("one restart counted", Duration::from_secs(10), || {
        match of(&agent, "nodescope_process_restarts_total", "proc") {
            Some(1.0) => Ok(()),
            other => Err(format!("restarts {other:?} after one restart")),
        }
    });
}

#[test]
fn resources_metrics_pass_promtool() {
    let _serial = serial();
    require_root();
    require_tool("promtool", "prometheus");
    let datadir = TempDir::new("promtool-datadir");
    let node = Proc(Command::new("sleep").arg("600").spawn().unwrap());
    let dir = TempDir::new("promtool-agent");
    let pid_file = dir.path().join("node.pid");
    write_pid_file(&pid_file, node.0.id());
    let agent = Agent::start(&format!(
        "[agent]\ninterval = \"250ms\"\n\n[[targets]]\nname = \"lint\"\npid_file = \"{}\"\ndatadir = \"{}\"\n",
        pid_file.display(),
        datadir.path().display()
    ));
    eventually("the data dir size", Duration::from_secs(10), || {
        of(&agent, "nodescope_datadir_size_bytes", "lint").map(drop).ok_or_else(|| "absent".into())
    });
    let text = agent.metrics();
    let ours: String = text
        .lines()
        .filter(|l| {
            let name = l.trim_start_matches("# HELP ").trim_start_matches("# TYPE ");
            ["nodescope_filesystem", "nodescope_datadir", "nodescope_cgroup", "nodescope_process"]
                .iter()
                .any(|p| name.starts_with(p))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(ours.contains("nodescope_process_rss_bytes"), "{text}");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(ours.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n{ours}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

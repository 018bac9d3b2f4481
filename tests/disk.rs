//! The disk signal against real writers: a small C program that writes known
//! bytes to a litecoin-like data dir with every write and sync call, a real
//! litecoind mining blocks, and real monerods writing LMDB by write calls and
//! by msync. nodescope's figures are checked against what the writer knows it
//! did and against strace attached to the same processes.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Writes a litecoin-like data dir with every call the signal counts, after
/// reading "go" on stdin; prints "done", then keeps its mapping until stdin
/// closes. The expected figures are in `EXPECTED_WRITES` / `EXPECTED_SYNCS`.
const WRITER_C: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

static const char *dir;
static char buf[16384];

static void die(const char *what) { fprintf(stderr, "writer: %s: %s\n", what, strerror(errno)); exit(2); }

static int openf(const char *rel, int flags) {
	char p[4096];
	snprintf(p, sizeof p, "%s/%s", dir, rel);
	int fd = open(p, flags | O_CLOEXEC, 0644);
	if (fd < 0) die(p);
	return fd;
}
static void wr(int fd, size_t n) { if (write(fd, buf, n) != (ssize_t)n) die("write"); }
static void pwr(int fd, size_t n, off_t off) { if (pwrite(fd, buf, n, off) != (ssize_t)n) die("pwrite"); }
static void md(const char *rel) {
	char p[4096];
	snprintf(p, sizeof p, "%s/%s", dir, rel);
	if (mkdir(p, 0755) && errno != EEXIST) die(p);
}
static void ren(const char *from, const char *to) {
	char a[4096], b[4096];
	snprintf(a, sizeof a, "%s/%s", dir, from);
	snprintf(b, sizeof b, "%s/%s", dir, to);
	if (rename(a, b)) die("rename");
}

int main(int argc, char **argv) {
	if (argc != 2) return 2;
	dir = argv[1];
	memset(buf, 'x', sizeof buf);
	signal(SIGXFSZ, SIG_IGN);
	md("blocks"); md("blocks/index"); md("chainstate"); md("indexes"); md("indexes/txindex"); md("wallets"); md("wallets/w");
	char line[16];
	if (!fgets(line, sizeof line, stdin)) return 3;

	int fd = openf("blocks/blk00000.dat", O_CREAT | O_WRONLY);
	wr(fd, 1000); wr(fd, 1000); wr(fd, 1000);
	pwr(fd, 500, 0); pwr(fd, 500, 5000);
	if (fdatasync(fd) || fdatasync(fd)) die("fdatasync");
	close(fd);

	fd = openf("blocks/rev00000.dat", O_CREAT | O_WRONLY);
	struct iovec three[3] = {{buf, 100}, {buf, 200}, {buf, 300}};
	for (int i = 0; i < 2; i++) if (writev(fd, three, 3) != 600) die("writev");
	if (fsync(fd)) die("fsync");
	close(fd);

	fd = openf("blocks/index/000003.ldb", O_CREAT | O_WRONLY);
	wr(fd, 4096);
	if (fsync(fd)) die("fsync");
	close(fd);

	fd = openf("chainstate/000005.ldb", O_CREAT | O_RDWR);
	struct iovec two[2] = {{buf, 1024}, {buf, 1024}};
	if (syscall(SYS_pwritev, fd, two, 2, 0L, 0L) != 2048) die("pwritev");
	struct iovec one[1] = {{buf, 777}};
	if (syscall(SYS_pwritev2, fd, one, 1, 4096L, 0L, 0) != 777) die("pwritev2");
	if (sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER)) die("sync_file_range");
	if (fdatasync(fd)) die("fdatasync");
	close(fd);
	/* a directory fsync, as LevelDB does after creating files */
	fd = openf("chainstate", O_RDONLY | O_DIRECTORY);
	if (fsync(fd)) die("fsync dir");
	close(fd);

	fd = openf("indexes/txindex/000001.ldb", O_CREAT | O_WRONLY);
	wr(fd, 333); wr(fd, 333);
	close(fd);

	fd = openf("mempool.dat.new", O_CREAT | O_WRONLY);
	wr(fd, 12345);
	if (fsync(fd)) die("fsync");
	close(fd);
	ren("mempool.dat.new", "mempool.dat");
	fd = openf("peers.dat.1a2b", O_CREAT | O_WRONLY);
	wr(fd, 2222);
	if (fsync(fd)) die("fsync");
	close(fd);
	ren("peers.dat.1a2b", "peers.dat");

	fd = openf("wallets/w/wallet.dat", O_CREAT | O_RDWR);
	pwr(fd, 8192, 0);
	if (fdatasync(fd)) die("fdatasync");
	close(fd);

	int log = openf("debug.log", O_CREAT | O_WRONLY | O_APPEND);
	for (int i = 0; i < 10; i++) wr(log, 80);

	fd = openf("settings.json", O_CREAT | O_WRONLY);
	wr(fd, 42); wr(fd, 0);
	close(fd);

	/* fd numbers reused by files of another class */
	fd = openf("blocks/blk00001.dat", O_CREAT | O_WRONLY);
	wr(fd, 111);
	close(fd);
	int again = openf("debug.log", O_WRONLY | O_APPEND);
	if (again != fd) { errno = 0; die("fd number not reused"); }
	wr(again, 222);
	close(again);

	/* dup2 over an open fd: writes through it go to the new file */
	int a = openf("chainstate/000007.ldb", O_CREAT | O_WRONLY);
	wr(a, 50);
	int b = openf("settings2.json", O_CREAT | O_WRONLY);
	wr(b, 60);
	if (dup2(a, b) != b) die("dup2");
	wr(b, 70);
	close(a); close(b);

	/* a short write: only what the kernel took counts; a failed one not at all */
	struct rlimit rl, small;
	getrlimit(RLIMIT_FSIZE, &rl);
	small = rl; small.rlim_cur = 1 << 20;
	if (setrlimit(RLIMIT_FSIZE, &small)) die("setrlimit");
	fd = openf("blocks/blk00002.dat", O_CREAT | O_WRONLY);
	if (pwrite(fd, buf, 4096, (1 << 20) - 1000) != 1000) die("short pwrite");
	if (pwrite(fd, buf, 10, 1 << 20) != -1 || errno != EFBIG) die("EFBIG expected");
	if (setrlimit(RLIMIT_FSIZE, &rl)) die("setrlimit");
	close(fd);

	/* msync has no fd: its file is found through the mapping */
	fd = openf("chainstate/map.ldb", O_CREAT | O_RDWR);
	if (ftruncate(fd, 8192)) die("ftruncate");
	char *m = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (m == MAP_FAILED) die("mmap");
	close(fd);
	memset(m, 'y', 8192);
	if (msync(m, 8192, MS_SYNC)) die("msync");
	m[0] = 'z';
	if (msync(m, 8192, MS_SYNC)) die("msync");

	/* not files: never counted */
	int p[2];
	if (pipe(p)) die("pipe");
	wr(p[1], 100);
	if (fsync(p[1]) == 0) die("fsync on a pipe worked?");
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) die("socketpair");
	wr(sv[0], 100);
	int devnull = open("/dev/null", O_WRONLY);
	wr(devnull, 100);
	/* a failed write to a file: not counted */
	fd = openf("settings.json", O_RDONLY);
	if (write(fd, buf, 10) != -1) die("write to a read-only fd worked?");
	close(fd);

	printf("done\n");
	fflush(stdout);
	while (read(0, line, sizeof line) > 0) {}
	return 0;
}
"#;

/// (class, write call) -> (calls, bytes) the writer makes.
const EXPECTED_WRITES: &[(&str, &str, u64, u64)] = &[
    ("blocks", "write", 4, 3111),
    ("blocks", "pwrite64", 3, 2000),
    ("blocks", "writev", 2, 1200),
    ("block_index", "write", 1, 4096),
    ("chainstate", "pwritev", 1, 2048),
    ("chainstate", "pwritev2", 1, 777),
    ("chainstate", "write", 2, 120),
    ("indexes", "write", 2, 666),
    ("mempool", "write", 1, 12345),
    ("peers", "write", 1, 2222),
    ("wallet", "pwrite64", 1, 8192),
    ("log", "write", 11, 1022),
    ("other", "write", 3, 102),
];

/// (class, sync call) -> calls the writer makes.
const EXPECTED_SYNCS: &[(&str, &str, u64)] = &[
    ("blocks", "fdatasync", 2),
    ("blocks", "fsync", 1),
    ("block_index", "fsync", 1),
    ("chainstate", "sync_file_range", 1),
    ("chainstate", "fdatasync", 1),
    ("chainstate", "fsync", 1),
    ("chainstate", "msync", 2),
    ("mempool", "fsync", 1),
    ("peers", "fsync", 1),
    ("wallet", "fdatasync", 1),
];

const TRACED: &str = "write,pwrite64,writev,pwritev,pwritev2,fsync,fdatasync,msync,sync_file_range";
const WRITE_CALLS: [&str; 5] = ["write", "pwrite64", "writev", "pwritev", "pwritev2"];

fn compile_writer(dir: &Path) -> PathBuf {
    require_tool("cc", "gcc");
    let src = dir.join("writer.c");
    let exe = dir.join("writer");
    std::fs::write(&src, WRITER_C).unwrap();
    let out = Command::new("cc").args(["-O1", "-Wall", "-o"]).arg(&exe).arg(&src).output().unwrap();
    assert!(out.status.success(), "compiling the writer: {}", String::from_utf8_lossy(&out.stderr));
    exe
}

/// The writer, started in `cgroup` (or where the test runs), waiting for "go".
struct Writer {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Writer {
    fn start(cgroup: Option<&Cgroup>, exe: &Path, datadir: &Path, log: &Path) -> Writer {
        let script = match cgroup {
            Some(c) => format!("echo $$ > '{}/cgroup.procs' && exec \"$0\" \"$@\"", c.path.display()),
            None => "exec \"$0\" \"$@\"".to_string(),
        };
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(exe)
            .arg(datadir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        // the exec is done once /proc/PID/exe is the writer
        let pid = child.id();
        wait_for("the writer to exec", Duration::from_secs(10), || {
            (std::fs::read_link(format!("/proc/{pid}/exe")).ok()? == exe).then_some(())
        });
        Writer { child, stdin, stdout }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn go(&mut self) {
        self.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    }

    fn wait_done(&mut self) {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "done", "the writer failed (see its log)");
    }

    /// Lets it exit (it unmaps and closes everything).
    fn finish(mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                assert!(st.success(), "writer exited with {st}");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("writer did not exit");
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5));
    }
}

/// strace attached to running processes (all their threads), stopped by
/// pid. It runs outside the watched cgroups, so its own writes never count.
struct Strace {
    child: Child,
    out: PathBuf,
}

impl Strace {
    fn attach(pids: &[u32], out: &Path) -> Strace {
        require_tool("strace", "strace");
        let mut cmd = Command::new("strace");
        cmd.args(["-f", "-y", "-s", "0", "-e", &format!("trace={TRACED}"), "-o"]).arg(out);
        for pid in pids {
            cmd.args(["-p", &pid.to_string()]);
        }
        let messages = out.with_extension("err");
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&messages).unwrap()).spawn().unwrap();
        let s = Strace { child, out: out.to_path_buf() };
        // strace says "Process N attached" once it has seized and stopped
        // every thread of N: from then on no call of N escapes it.
        wait_for("strace to attach", Duration::from_secs(30), || {
            let said = std::fs::read_to_string(&messages).unwrap_or_default();
            let attached = |pid: &u32| said.lines().any(|l| l.starts_with(&format!("strace: Process {pid} attached")));
            pids.iter().all(|pid| attached(pid) && all_threads_traced(*pid)).then_some(())
        });
        s
    }

    fn stop(mut self) -> Vec<Call> {
        stop_child(&mut self.child, Duration::from_secs(20));
        parse_strace(&std::fs::read_to_string(&self.out).unwrap())
    }
}

impl Drop for Strace {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(20));
    }
}

fn all_threads_traced(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.filter_map(Result::ok).all(|t| {
        std::fs::read_to_string(t.path().join("status"))
            .map(|s| s.lines().any(|l| l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0")))
            .unwrap_or(true) // the thread exited meanwhile
    })
}

/// One completed syscall from strace's output.
#[derive(Debug, Clone)]
struct Call {
    name: String,
    /// The fd's path (strace -y), None for msync and for non-path fds.
    path: Option<String>,
    ret: i64,
}

/// strace -f -y output, joining "<unfinished ...>" with "<... resumed>".
fn parse_strace(text: &str) -> Vec<Call> {
    let mut pending: BTreeMap<String, (String, Option<String>)> = BTreeMap::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((pid, rest)) = line.split_once(' ') else { continue };
        let rest = rest.trim_start();
        let (name, path, tail) = if let Some(r) = rest.strip_prefix("<... ") {
            let Some((name, tail)) = r.split_once(" resumed>") else { continue };
            let Some((pname, path)) = pending.remove(pid) else { continue };
            assert_eq!(pname, name, "strace resumed another call: {line}");
            (name.to_string(), path, tail.to_string())
        } else {
            let Some((name, args)) = rest.split_once('(') else { continue };
            if !TRACED.split(',').any(|t| t == name) {
                continue;
            }
            let path = args
                .split_once('<')
                .filter(|(fd, _)| fd.chars().all(|c| c.is_ascii_digit()) && !fd.is_empty())
                .and_then(|(_, p)| p.split_once('>'))
                .map(|(p, _)| p.to_string());
            if rest.ends_with("<unfinished ...>") {
                pending.insert(pid.to_string(), (name.to_string(), path));
                continue;
            }
            (name.to_string(), path, args.to_string())
        };
        // strace pads short calls: "fsync(3</x>)    = 0"
        let Some((_, ret)) = tail.rsplit_once(" = ") else { continue };
        let Ok(ret) = ret.split_whitespace().next().unwrap_or("").parse::<i64>() else { continue };
        out.push(Call { name, path, ret });
    }
    out
}

/// Regular files and directories: what nodescope counts (no sockets, pipes, devices).
fn is_file(path: &Option<String>) -> bool {
    path.as_deref().is_some_and(|p| p.starts_with('/') && !p.starts_with("/dev/"))
}

/// The writer's classes, decided by the test on its own.
fn writer_class(call: &Call) -> &'static str {
    let Some(p) = call.path.as_deref() else { return "chainstate" }; // msync of chainstate/map.ldb
    if p.contains("/blocks/index/") {
        "block_index"
    } else if p.contains("/blocks/blk") || p.contains("/blocks/rev") {
        "blocks"
    } else if p.contains("/chainstate") {
        "chainstate"
    } else if p.contains("/indexes/") {
        "indexes"
    } else if p.contains("mempool.dat") {
        "mempool"
    } else if p.contains("peers.dat") {
        "peers"
    } else if p.contains("/wallets/") {
        "wallet"
    } else if p.ends_with("/debug.log") {
        "log"
    } else {
        "other"
    }
}

/// The agent's scrape once two in a row agree on every disk series.
fn settled_metrics(agent: &Agent) -> String {
    let keep = |t: &str| {
        t.lines().filter(|l| l.starts_with("nodescope_file_") || l.starts_with("nodescope_disk_")).collect::<Vec<_>>().join("\n")
    };
    let mut last = agent.metrics();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        std::thread::sleep(Duration::from_millis(1200));
        let m = agent.metrics();
        if keep(&m) == keep(&last) {
            return m;
        }
        assert!(Instant::now() < deadline, "disk metrics never settled");
        last = m;
    }
}

/// Metrics once `target`'s written bytes have not moved for `quiet` (the
/// node is idle), within a minute.
fn quiet_metrics(agent: &Agent, target: &str, quiet: Duration) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = agent.metrics();
    let mut since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let m = agent.metrics();
        if total_written(&m, target) != total_written(&last, target) {
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return m;
        }
        assert!(Instant::now() < deadline, "{target} never went quiet for {quiet:?}");
        last = m;
    }
}

fn written(m: &str, target: &str, class: &str) -> f64 {
    metric_sum(m, "nodescope_file_written_bytes_total", &[("nodescope_target", target), ("nodescope_file_class", class)])
}

fn writes(m: &str, target: &str, class: &str, call: &str) -> f64 {
    metric_sum(m, "nodescope_file_writes_total", &[("nodescope_target", target), ("nodescope_file_class", class), ("nodescope_write_call", call)])
}

fn syncs(m: &str, target: &str, class: &str, call: &str) -> f64 {
    metric_sum(m, "nodescope_file_sync_duration_seconds_count", &[("nodescope_target", target), ("nodescope_file_class", class), ("nodescope_sync_call", call)])
}

fn total_written(m: &str, target: &str) -> f64 {
    metric_sum(m, "nodescope_file_written_bytes_total", &[("nodescope_target", target)])
}

/// Waits until the agent has resolved `names` to running processes, then
/// one more loop so the kernel maps hold them.
fn wait_watching(agent: &Agent, names: &[&str]) {
    wait_for("the agent to watch the targets", Duration::from_secs(30), || {
        let log = strip_ansi(&agent.log());
        names.iter().all(|n| log.lines().any(|l| l.contains("watching node") && l.contains(&format!("target_name={n} ")))).then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ params final-letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The (tgid, fd) keys of the agent's `ns_disk_files` map, as bpftool reads
/// them from the kernel.
fn kernel_file_keys(agent: &Agent) -> Vec<(u32, u32)> {
    require_tool("bpftool", "bpftool");
    let bpftool = |args: &[&str]| -> serde_json::Value {
        let out = Command::new("bpftool").arg("-j").args(args).output().unwrap();
        assert!(out.status.success(), "bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // the maps the agent holds, from its fds' fdinfo ("map_id:")
    let fdinfo = std::fs::read_dir(format!("/proc/{}/fdinfo", agent.child.id())).unwrap();
    let held: Vec<u64> = fdinfo
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|info| info.lines().find_map(|l| l.strip_prefix("map_id:")).and_then(|id| id.trim().parse().ok()))
        .collect();
    let maps = bpftool(&["map", "show"]);
    let ids: Vec<String> = maps
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["name"] == "ns_disk_files" && m["id"].as_u64().is_some_and(|id| held.contains(&id)))
        .map(|m| m["id"].to_string())
        .collect();
    assert_eq!(ids.len(), 1, "the agent's ns_disk_files map among {held:?}: {maps:#}");
    let byte = |v: &serde_json::Value| u8::from_str_radix(v.as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
    bpftool(&["map", "dump", "id", &ids[0]])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let key: Vec<u8> = e["key"].as_array().unwrap().iter().map(byte).collect();
            let word = |at: usize| u32::from_ne_bytes(key[at..at + 4].try_into().unwrap());
            (word(0), word(4))
        })
        .collect()
}

/// Every write and sync call of a known writer is counted exactly, in the
/// right class, for a target with its own cgroup and for one that shares
/// its cgroup (scoped by pid), and matches strace; writes by other
/// processes to the same files, to pipes, sockets and devices are not.
#[test]
fn controlled_writer_counts_are_exact() {
    require_root();
    let work = TempDir::new("disk-writer");
    let exe = compile_writer(work.path());
    let cgroup = Cgroup::new();
    let (ltc_dir, solo_dir) = (work.path().join("ltc"), work.path().join("solo"));
    std::fs::create_dir_all(&ltc_dir).unwrap();
    std::fs::create_dir_all(&solo_dir).unwrap();
    let mut ltc = Writer::start(Some(&cgroup), &exe, &ltc_dir, &work.path().join("ltc.log"));
    let mut solo = Writer::start(None, &exe, &solo_dir, &work.path().join("solo.log"));
    let pid_file = work.path().join("solo.pid");
    std::fs::write(&pid_file, format!("{}\n", solo.pid())).unwrap();

    let agent = Agent::start(&format!(
        "[agent]\ninterval = \"500ms\"\n\n[[targets]]\nname = \"ltc\"\ncgroup = \"{}\"\nchain = \"litecoin\"\n\n[[targets]]\nname = \"solo\"\npid_file = \"{}\"\nchain = \"litecoin\"\n",
        cgroup.path.display(),
        pid_file.display()
    ));
    wait_watching(&agent, &["ltc", "solo"]);
    let m0 = settled_metrics(&agent);
    assert_eq!(total_written(&m0, "ltc") + total_written(&m0, "solo"), 0.0, "nothing written yet:\n{m0}");

    let strace = Strace::attach(&[ltc.pid(), solo.pid()], &work.path().join("strace.txt"));
    // someone else writing to the same files meanwhile: not counted
    let outsider = Command::new("dd")
        .args(["if=/dev/zero", &format!("of={}/blocks/blk00009.dat", ltc_dir.display()), "bs=4096", "count=256", "conv=fsync"])
        .stderr(Stdio::null())
        .spawn();
    ltc.go();
    solo.go();
    ltc.wait_done();
    solo.wait_done();
    let _ = outsider.and_then(|mut c| c.wait());
    let m = settled_metrics(&agent);
    let calls = strace.stop();

    let mut problems = String::new();
    for target in ["ltc", "solo"] {
        for (class, call, n, _) in EXPECTED_WRITES {
            let got = writes(&m, target, class, call);
            if got != *n as f64 {
                problems += &format!("{target} {class} {call}: {got} calls, wrote {n}\n");
            }
        }
        for class in ["blocks", "block_index", "chainstate", "indexes", "mempool", "peers", "wallet", "log", "other"] {
            let want: u64 = EXPECTED_WRITES.iter().filter(|e| e.0 == class).map(|e| e.3).sum();
            let got = written(&m, target, class);
            if got != want as f64 {
                problems += &format!("{target} {class}: {got} bytes, wrote {want}\n");
            }
        }
        for (class, call, n) in EXPECTED_SYNCS {
            let got = syncs(&m, target, class, call);
            if got != *n as f64 {
                problems += &format!("{target} {class} {call}: {got} syncs, made {n}\n");
            }
        }
        let all_writes = metric_sum(&m, "nodescope_file_writes_total", &[("nodescope_target", target)]);
        let want_writes: u64 = EXPECTED_WRITES.iter().map(|e| e.2).sum();
        if all_writes != want_writes as f64 {
            problems += &format!("{target}: {all_writes} write calls in all, made {want_writes}\n");
        }
        let all_syncs = metric_sum(&m, "nodescope_file_sync_duration_seconds_count", &[("nodescope_target", target)]);
        let want_syncs: u64 = EXPECTED_SYNCS.iter().map(|e| e.2).sum();
        if all_syncs != want_syncs as f64 {
            problems += &format!("{target}: {all_syncs} sync calls in all, made {want_syncs}\n");
        }
    }
    assert!(problems.is_empty(), "{problems}\n{m}");

    // strace saw the same: both writers together, per class and call
    let mut traced: BTreeMap<(&str, String), (u64, u64)> = BTreeMap::new();
    for c in calls.iter().filter(|c| c.ret >= 0 && (c.name == "msync" || is_file(&c.path))) {
        let e = traced.entry((writer_class(c), c.name.clone())).or_default();
        e.0 += 1;
        e.1 += c.ret as u64;
    }
    for (class, call, n, bytes) in EXPECTED_WRITES {
        assert_eq!(traced.get(&(*class, call.to_string())), Some(&(2 * n, 2 * bytes)), "strace for {class} {call}: {traced:?}");
    }
    for (class, call, n) in EXPECTED_SYNCS {
        assert_eq!(traced.get(&(*class, call.to_string())).map(|e| e.0), Some(2 * n), "strace for {class} {call}: {traced:?}");
    }
    let traced_calls: u64 = traced.values().map(|e| e.0).sum();
    let expected_calls: u64 = 2 * (EXPECTED_WRITES.iter().map(|e| e.2).sum::<u64>() + EXPECTED_SYNCS.iter().map(|e| e.2).sum::<u64>());
    assert_eq!(traced_calls, expected_calls, "strace saw calls the test does not expect: {traced:?}");
    eprintln!("strace per (class, call) for both writers: {traced:?}");

    // histogram: cumulative buckets end at _count, and time was spent
    for target in ["ltc", "solo"] {
        let labels = [("nodescope_target", target), ("nodescope_file_class", "blocks"), ("nodescope_sync_call", "fdatasync")];
        let inf = metric_sum(&m, "nodescope_file_sync_duration_seconds_bucket", &[labels[0], labels[1], labels[2], ("le", "+Inf")]);
        assert_eq!(inf, 2.0, "{m}");
        assert!(metric_sum(&m, "nodescope_file_sync_duration_seconds_sum", &labels) > 0.0, "{m}");
    }
    let dropped = metric_sum(&m, "nodescope_disk_dropped_total", &[]);
    assert_eq!(dropped, 0.0, "nothing dropped:\n{m}");
    assert_promtool_ok(&m, work.path());

    // The writers exit with files, a pipe, a socket and /dev/null still open:
    // the agent sweeps their records without counting anything twice, and
    // the kernel's files map (read by bpftool) keeps none of their keys.
    let writer_pids = [ltc.pid(), solo.pid()];
    let before_exit = kernel_file_keys(&agent);
    assert!(writer_pids.iter().all(|pid| before_exit.iter().any(|(tgid, _)| tgid == pid)), "no records of the open fds: {before_exit:?}");
    ltc.finish();
    solo.finish();
    let after = settled_metrics(&agent);
    for target in ["ltc", "solo"] {
        assert_eq!(total_written(&after, target), total_written(&m, target), "{after}");
    }
    wait_for("the agent to free the exited writers' kernel records", Duration::from_secs(10), || {
        (!kernel_file_keys(&agent).iter().any(|(tgid, _)| writer_pids.contains(tgid))).then_some(())
    });

    // the hooks nodescope probes reports for this signal
    let out = Command::new(env!("CARGO_BIN_EXE_nodescope")).args(["probes", "--json"]).output().unwrap();
    let hooks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let disk: Vec<&serde_json::Value> = hooks.as_array().unwrap().iter().filter(|h| h["signal"] == "disk").collect();
    assert!(disk.len() >= 20 && disk.iter().all(|h| h["supported"] == true), "{hooks:#}");
    drop(agent);
    drop(cgroup);
}

fn strace_file_bytes(calls: &[Call], path_filter: impl Fn(&str) -> bool) -> (u64, u64) {
    calls
        .iter()
        .filter(|c| WRITE_CALLS.contains(&c.name.as_str()) && c.ret >= 0 && is_file(&c.path))
        .filter(|c| path_filter(c.path.as_deref().unwrap()))
        .fold((0, 0), |(n, b), c| (n + 1, b + c.ret as u64))
}

/// A real litecoind mining 500 blocks: its block files and chain state grow,
/// and the bytes nodescope counts match strace's sum of the same calls'
/// return values within 2%.
#[test]
fn litecoind_mining_matches_strace() {
    require_root();
    let cgroup = Cgroup::new();
    let node = Litecoind::start(Some(&cgroup), &["-connect=0".to_string()]);
    let addr = node.address();
    let agent = Agent::start(&format!(
        "[agent]\ninterval = \"500ms\"\n\n[[targets]]\nname = \"ltc\"\ncgroup = \"{}\"\nchain = \"litecoin\"\n",
        cgroup.path.display()
    ));
    wait_watching(&agent, &["ltc"]);
    let m0 = settled_metrics(&agent);

    let work = TempDir::new("disk-ltc");
    let strace = Strace::attach(&[node.pid()], &work.path().join("strace.txt"));
    let started = Instant::now();
    // Litecoin's MWEB activates at height 432 on regtest: the first block
    // after it needs a peg-in, so 431 blocks, a peg-in, then the other 69.
    node.cli(&["generatetoaddress", "431", &addr]);
    let mweb = node.cli(&["getnewaddress", "", "mweb"]);
    node.cli(&["sendtoaddress", &mweb, "1"]);
    node.cli(&["generatetoaddress", "69", &addr]);
    assert_eq!(node.cli(&["getblockcount"]), "500");
    // flushes the coins cache and block index to disk now rather than hourly
    node.cli(&["gettxoutsetinfo"]);
    eprintln!("mined 500 blocks under strace in {:?}", started.elapsed());
    // LevelDB compacts in a background thread after the flush: let the node
    // go quiet under strace, so both counts close over the same writes.
    let m1 = quiet_metrics(&agent, "ltc", Duration::from_secs(5));
    let calls = strace.stop();

    let delta = |m: &str, class: &str| written(m, "ltc", class) - written(&m0, "ltc", class);
    assert!(delta(&m1, "blocks") > 500.0 * 200.0, "blocks grew by {}:\n{m1}", delta(&m1, "blocks"));
    assert!(delta(&m1, "chainstate") > 0.0, "chainstate grew by {}:\n{m1}", delta(&m1, "chainstate"));
    assert!(delta(&m1, "block_index") > 0.0, "block index grew by {}:\n{m1}", delta(&m1, "block_index"));

    let ours = total_written(&m1, "ltc") - total_written(&m0, "ltc");
    let (n, theirs) = strace_file_bytes(&calls, |_| true);
    let (_, theirs_blocks) = strace_file_bytes(&calls, |p| p.contains("/blocks/blk") || p.contains("/blocks/rev"));
    eprintln!("litecoind wrote {ours} bytes by nodescope, {theirs} bytes in {n} calls by strace (blocks: {} vs {theirs_blocks})", delta(&m1, "blocks"));
    assert!(theirs > 0, "strace saw no file writes");
    assert!((ours - theirs as f64).abs() <= 0.02 * theirs as f64, "nodescope {ours} vs strace {theirs}");
    assert!((delta(&m1, "blocks") - theirs_blocks as f64).abs() <= 0.02 * theirs_blocks as f64);
    let syncs_ours = metric_sum(&m1, "nodescope_file_sync_duration_seconds_count", &[("nodescope_target", "ltc")])
        - metric_sum(&m0, "nodescope_file_sync_duration_seconds_count", &[("nodescope_target", "ltc")]);
    let syncs_theirs = calls.iter().filter(|c| c.ret == 0 && ["fsync", "fdatasync"].contains(&c.name.as_str()) && is_file(&c.path)).count();
    eprintln!("sync calls: nodescope {syncs_ours}, strace {syncs_theirs}");
    assert!((syncs_ours - syncs_theirs as f64).abs() <= (0.02 * syncs_theirs as f64).max(1.0));
    drop(agent);
    drop(node);
    drop(cgroup);
}

/// monerod regtest on loopback, in `cgroup`, with extra arguments.
struct Monerod {
    child: Child,
    dir: TempDir,
    rpc_port: u16,
}

/// A valid mainnet address (the Monero project's donation address);
/// monerod --regtest accepts it for generateblocks.
const MONERO_ADDRESS: &str = "44AFFq5kSiGBoZ4NMDwYtN18obc8AemS33DBLWs3H7otXft3XjrpDtQGv7SqSsaBYBb98uNbr2VBBEt7f2wfn3RVGQBEP3A";

impl Monerod {
    fn start(cgroup: &Cgroup, extra: &[&str]) -> Monerod {
        require_tool("monerod", "monero");
        let dir = TempDir::new("monerod");
        let rpc_port = free_port();
        let mut args: Vec<String> = [
            "--regtest", "--offline", "--fixed-difficulty", "1", "--no-igd", "--disable-dns-checkpoints",
            "--check-updates", "disabled", "--non-interactive", "--no-zmq", "--p2p-bind-ip", "127.0.0.1", "--rpc-bind-ip", "127.0.0.1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(["--data-dir".into(), dir.path().display().to_string()]);
        args.extend(["--p2p-bind-port".into(), free_port().to_string()]);
        args.extend(["--rpc-bind-port".into(), rpc_port.to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = spawn_in(Some(cgroup), "monerod", &args, &dir.path().join("stdout.log"));
        let mut node = Monerod { child, dir, rpc_port };
        wait_for("monerod RPC", Duration::from_secs(120), || {
            if let Ok(Some(st)) = node.child.try_wait() {
                panic!("monerod exited with {st}: {}", node.log());
            }
            node.rpc("get_info", "{}").ok().filter(|v| v["result"]["status"] == "OK")
        });
        node
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn rpc(&self, method: &str, params: &str) -> Result<serde_json::Value, String> {
        let body = format!("{{\"jsonrpc\":\"2.0\",\"id\":\"0\",\"method\":\"{method}\",\"params\":{params}}}");
        let mut s = TcpStream::connect(("127.0.0.1", self.rpc_port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(120))).map_err(|e| e.to_string())?;
        write!(
            s,
            "POST /json_rpc HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .map_err(|e| e.to_string())?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).map_err(|e| e.to_string())?;
        let json = resp.split_once("\r\n\r\n").map(|(_, b)| b).ok_or("no body")?;
        serde_json::from_str(json).map_err(|e| format!("{e}: {resp}"))
    }

    fn mine(&self, blocks: u32) {
        let v = self
            .rpc("generateblocks", &format!("{{\"amount_of_blocks\":{blocks},\"wallet_address\":\"{MONERO_ADDRESS}\"}}"))
            .unwrap_or_else(|e| panic!("generateblocks: {e}"));
        assert_eq!(v["result"]["status"], "OK", "generateblocks: {v}");
    }
}

impl Drop for Monerod {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(30));
    }
}

/// monerod writes LMDB two ways, both seen: by default with pwrite64/writev
/// and fdatasync on data.mdb; with --db-sync-mode fastest through its
/// writable map, so only msync, which nodescope attributes to lmdb through
/// /proc/PID/maps. Both checked against strace.
#[test]
fn monerod_lmdb_writes_and_syncs() {
    require_root();
    let (cg_default, cg_mapped) = (Cgroup::new(), Cgroup::new());
    let writes_node = Monerod::start(&cg_default, &[]);
    let mapped_node = Monerod::start(&cg_mapped, &["--db-sync-mode", "fastest:sync:1blocks"]);
    let agent = Agent::start(&format!(
        "[agent]\ninterval = \"500ms\"\n\n[[targets]]\nname = \"xmr\"\ncgroup = \"{}\"\nchain = \"monero\"\n\n[[targets]]\nname = \"xmr-map\"\ncgroup = \"{}\"\nchain = \"monero\"\n",
        cg_default.path.display(),
        cg_mapped.path.display()
    ));
    wait_watching(&agent, &["xmr", "xmr-map"]);
    let m0 = settled_metrics(&agent);
    let work = TempDir::new("disk-xmr");
    let strace = Strace::attach(&[writes_node.pid(), mapped_node.pid()], &work.path().join("strace.txt"));
    writes_node.mine(30);
    mapped_node.mine(30);
    // the nodes are done (their counts stopped moving) before strace lets
    // go, and the figures compared are the ones from inside its window
    let m2 = settled_metrics(&agent);
    let calls = strace.stop();

    let d = |f: &dyn Fn(&str) -> f64| f(&m2) - f(&m0);
    let lmdb_bytes = d(&|m| written(m, "xmr", "lmdb"));
    let lmdb_fdatasync = d(&|m| syncs(m, "xmr", "lmdb", "fdatasync"));
    let map_msync = d(&|m| syncs(m, "xmr-map", "lmdb", "msync"));
    let map_msync_other = d(&|m| syncs(m, "xmr-map", "other", "msync"));

    // strace, split by node: lines carry no target, but the data dirs differ
    let in_dir = |c: &Call, dir: &Path| c.path.as_deref().is_some_and(|p| p.starts_with(&dir.display().to_string()));
    let (_, strace_lmdb) = strace_file_bytes(&calls, |p| p.starts_with(&writes_node.dir.path().display().to_string()) && p.contains("/lmdb/"));
    let strace_fdatasync = calls.iter().filter(|c| c.name == "fdatasync" && c.ret == 0 && in_dir(c, writes_node.dir.path()) && c.path.as_deref().unwrap().contains("/lmdb/")).count();
    let strace_msync = calls.iter().filter(|c| c.name == "msync" && c.ret == 0).count();
    eprintln!(
        "monerod lmdb: nodescope {lmdb_bytes} bytes, {lmdb_fdatasync} fdatasync; strace {strace_lmdb} bytes, {strace_fdatasync} fdatasync; \
         mapped monerod msync: nodescope {map_msync} (+{map_msync_other} other), strace {strace_msync}"
    );
    assert!(strace_lmdb > 0 && strace_fdatasync > 0, "strace saw no LMDB writes: {}", writes_node.log());
    assert!((lmdb_bytes - strace_lmdb as f64).abs() <= 0.02 * strace_lmdb as f64, "lmdb bytes: nodescope {lmdb_bytes} vs strace {strace_lmdb}\n{m2}");
    assert_eq!(lmdb_fdatasync, strace_fdatasync as f64, "{m2}");
    assert!(d(&|m| metric_sum(m, "nodescope_file_writes_total", &[("nodescope_target", "xmr"), ("nodescope_file_class", "lmdb")])) > 0.0);
    assert!(strace_msync > 0, "the fastest sync mode made no msync: {}", mapped_node.log());
    assert_eq!(map_msync, strace_msync as f64, "msync calls of the mapped node all in class lmdb\n{m2}");
    assert_eq!(map_msync_other, 0.0);
    drop(agent);
    drop((writes_node, mapped_node));
    drop((cg_default, cg_mapped));
}

/// A process that joins a watched group (here a child group made after the
/// agent started: the group's whole subtree is the node's), writes and exits
/// well within one interval is counted to the byte: scope is kept in the
/// kernel, not resolved once per interval.
#[test]
fn short_lived_writer_in_watched_subtree_is_counted() {
    require_root();
    let work = TempDir::new("disk-short");
    let datadir = work.path().join("ltc");
    std::fs::create_dir_all(datadir.join("blocks")).unwrap();
    let cgroup = Cgroup::new();
    let interval = Duration::from_secs(10);
    let agent = Agent::start(&format!(
        "[agent]\ninterval = \"10s\"\n\n[[targets]]\nname = \"ltc\"\ncgroup = \"{}\"\nchain = \"litecoin\"\n",
        cgroup.path.display()
    ));
    // one collection done: the empty group is in the kernel's maps
    wait_for("the first collection", Duration::from_secs(30), || agent.metrics().contains("nodescope_health_status{").then_some(()));
    let child = cgroup.path.join("writer");
    std::fs::create_dir(&child).unwrap();
    let started = Instant::now();
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > '{}/cgroup.procs' && exec dd if=/dev/zero of='{}' bs=65536 count=100 conv=fsync",
            child.display(),
            datadir.join("blocks/blk00000.dat").display()
        ))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    let took = started.elapsed();
    assert!(status.success());
    std::fs::remove_dir(&child).unwrap();
    assert!(took < interval / 2, "the writer took {took:?}: not short-lived against a {interval:?} interval");
    let size = std::fs::metadata(datadir.join("blocks/blk00000.dat")).unwrap().len();
    assert_eq!(size, 6_553_600);
    let m = wait_for("the next collection to count the writer", interval * 3, || {
        let m = agent.metrics();
        (total_written(&m, "ltc") > 0.0).then_some(m)
    });
    assert_eq!(written(&m, "ltc", "blocks"), 6_553_600.0, "the file holds 6,553,600 bytes written by 100 calls:\n{}", m.lines().filter(|l| l.starts_with("nodescope_file_")).collect::<Vec<_>>().join("\n"));
    assert_eq!(writes(&m, "ltc", "blocks", "write"), 100.0);
    assert_eq!(syncs(&m, "ltc", "blocks", "fsync"), 1.0);
}

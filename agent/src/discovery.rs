//! Finds node processes on the host and works out how each one runs.
//!
//! Everything comes from /proc and the node's own config file: nodescope never
//! talks to the node, so it can describe one that is stuck, still starting, or
//! has its RPC locked down. Every function takes the procfs root so tests can
//! point it at a fake tree; real callers pass "/proc".
//!
//! Paths are reported as the node sees them (its command line, its config,
//! /health/detailed) and opened as the node would open them. A node in a
//! container has a mount namespace of its own: its data dir, config file and
//! passwd file exist only there, and are read through `/proc/PID/root` (see
//! `read_node_file`), so no volume has to be mounted into the agent.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use procfs::process::FDTarget;

use crate::chain::{Chain, Network, PeerNetwork, Ports};

/// Where a process's home dir is looked up when its environment is unreadable.
const PASSWD: &str = "/etc/passwd";
/// Config and passwd files are far smaller; a bigger one is not one, and the
/// bound keeps a file the node controls from making the agent read forever.
const NODE_FILE_MAX_BYTES: u64 = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub pid: u32,
    pub chain: Chain,
    pub network: Network,
    /// base data dir (what -datadir / --data-dir says, or the chain default under the process user's HOME)
    pub datadir: Option<PathBuf>,
    /// the network's own data dir (datadir joined with the network subdir), where blocks/chainstate/lmdb live
    pub network_datadir: Option<PathBuf>,
    /// P2P ports: from -port= / --p2p-bind-port (cmdline first, then the node's config file), else the chain default for the network
    pub p2p_ports: Vec<u16>,
    /// RPC ports: -rpcport= / --rpc-bind-port (and monero --rpc-restricted-bind-port), else defaults
    pub rpc_ports: Vec<u16>,
    /// The proxies the node reaches peers through (Core's -proxy, -onion,
    /// -i2psam; monerod's --proxy, --tx-proxy), by what they carry.
    pub proxies: Vec<(SocketAddr, PeerNetwork)>,
    /// Local ports where peers arrive through Tor or I2P (Core's
    /// `-bind=...=onion` or its default onion port; monerod's
    /// --anonymous-inbound). Core's default counts only if the node listens there.
    pub onion_ports: Vec<(u16, PeerNetwork)>,
    /// The node's own log file: Core's debug.log in the network's data dir
    /// or where -debuglogfile puts it (None for -nodebuglogfile); monerod's
    /// bitmonero.log beside its database or its --log-file.
    pub log_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Proc { path: PathBuf, source: procfs::ProcError },
    #[error("pid file {path}: {reason}")]
    PidFile { path: PathBuf, reason: String },
}

/// All processes whose comm names a known chain, as (pid, chain), sorted by
/// pid. Only processes are listed, not their threads; processes that vanish
/// mid-scan are skipped, and an unreadable procfs root yields no nodes.
pub fn find_nodes(proc_root: &Path) -> Vec<(u32, Chain)> {
    pids(proc_root)
        .into_iter()
        .filter_map(|pid| Some((pid, Chain::from_process_name(&read_comm(proc_root, pid)?)?)))
        .collect()
}

/// Pids whose comm equals `name` exactly, sorted. The kernel truncates comm
/// to 15 bytes, so a longer name never matches.
pub fn find_by_name(proc_root: &Path, name: &str) -> Vec<u32> {
    pids(proc_root).into_iter().filter(|&pid| read_comm(proc_root, pid).as_deref() == Some(name)).collect()
}

/// Reads a pid file (trimmed decimal) and checks that the process is alive.
pub fn read_pid_file(proc_root: &Path, path: &Path) -> Result<u32, DiscoveryError> {
    let raw = fs::read(path).map_err(|source| DiscoveryError::Io { path: path.to_path_buf(), source })?;
    let fail = |reason: String| DiscoveryError::PidFile { path: path.to_path_buf(), reason };
    let text = String::from_utf8_lossy(&raw);
    let text = text.trim();
    if text.is_empty() {
        return Err(fail("empty".to_owned()));
    }
    let pid = parse_pid(text).ok_or_else(|| {
        // Keep the message one readable line even if the file is binary junk.
        let shown: String = text.chars().take(32).collect();
        fail(format!("{shown:?} is not a process id"))
    })?;
    if !is_alive(proc_root, pid) {
        return Err(fail(format!("process {pid} is not running")));
    }
    Ok(pid)
}

/// Whether the pid is alive: its /proc dir exists and it is not a zombie.
pub fn is_alive(proc_root: &Path, pid: u32) -> bool {
    match stat(proc_root, pid) {
        // X (dead) is only visible for an instant, but is no more alive than Z.
        Some(stat) => !matches!(stat.state, 'Z' | 'X' | 'x'),
        // Existence is all there is to go on when stat can't be read.
        None => pid_dir(proc_root, pid).is_dir(),
    }
}

/// Reads the process's command line, environment and config file and fills
/// NodeInfo. Fails only when the process itself can't be read; an unreadable
/// config file or environment falls back to what the node would default to.
pub fn inspect(proc_root: &Path, pid: u32, chain: Chain) -> Result<NodeInfo, DiscoveryError> {
    let process = Process::new(proc_root, pid);
    let args = process.args()?;
    Ok(match chain {
        Chain::Bitcoin | Chain::Litecoin => inspect_core(&process, pid, chain, &args),
        Chain::Monero => inspect_monero(&process, pid, &args),
        Chain::Generic => NodeInfo {
            pid,
            chain,
            network: Network::Main,
            datadir: None,
            network_datadir: None,
            p2p_ports: Vec::new(),
            rpc_ports: Vec::new(),
            proxies: Vec::new(),
            onion_ports: Vec::new(),
            log_file: None,
        },
    })
}

/// TCP ports the process listens on: its socket inodes (from /proc/PID/fd)
/// that are listening sockets of its network namespace. On the live /proc
/// those come from a LISTEN-only sock_diag dump made in the node's namespace
/// (sockdiag.rs: its cost does not grow with the namespace's connections);
/// where that cannot be had (another proc root, no privilege to join the
/// namespace) from the LISTEN rows of /proc/PID/net/tcp and tcp6, which are
/// per namespace too. Sorted, deduplicated.
pub fn listening_ports(proc_root: &Path, pid: u32) -> Result<Vec<u16>, DiscoveryError> {
    let process = proc_process(proc_root, pid)?;
    let inodes = socket_inodes_of(&process, &pid_dir(proc_root, pid))?;
    if inodes.is_empty() {
        return Ok(Vec::new());
    }
    let listeners = listeners_in_netns_of(proc_root, pid)?;
    let mut ports: Vec<u16> =
        listeners.into_iter().filter(|(inode, _)| inodes.contains(inode)).map(|(_, p)| p).collect();
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

/// (socket inode, local port) of every TCP listener in the network
/// namespace of `pid`: a sock_diag dump inside it on a live system, else (a
/// test's /proc, or a failed dump) the LISTEN rows of its TCP tables.
fn listeners_in_netns_of(proc_root: &Path, pid: u32) -> Result<Vec<(u64, u16)>, DiscoveryError> {
    if proc_root == Path::new("/proc") {
        let dumped = if crate::netns::is_ours(pid) {
            crate::sockdiag::listeners()
        } else {
            crate::netns::run_in(pid, crate::sockdiag::listeners).and_then(|r| r)
        };
        match dumped {
            Ok(listeners) => return Ok(listeners),
            Err(e) => tracing::debug!("listening sockets of pid {pid} by sock_diag: {e}; reading its TCP tables"),
        }
    }
    listeners_from_tables(proc_root, pid)
}

/// The LISTEN rows of /proc/PID/net/tcp and tcp6.
fn listeners_from_tables(proc_root: &Path, pid: u32) -> Result<Vec<(u64, u16)>, DiscoveryError> {
    let mut listeners = Vec::new();
    for table in ["net/tcp", "net/tcp6"] {
        let path = pid_dir(proc_root, pid).join(table);
        let proc_error = |path: PathBuf, e| DiscoveryError::Proc { path, source: procfs::ProcError::Io(e, None) };
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            // tcp6 is absent when the kernel has IPv6 disabled.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(proc_error(path, e)),
        };
        // Row by row through one buffer: after a connection flood the table
        // is tens of MB (100,000 TIME_WAIT rows), which a whole read would
        // hold at once.
        let mut reader = std::io::BufReader::new(file);
        let mut line = String::new();
        let mut header = true;
        loop {
            line.clear();
            match std::io::BufRead::read_line(&mut reader, &mut line) {
                Ok(0) => break,
                Ok(_) if std::mem::take(&mut header) => {}
                Ok(_) => {
                    let Some(row) = listen_row(&line) else { continue };
                    // the same bound as the dump's (sockdiag::MAX_LISTENERS)
                    if listeners.len() >= crate::sockdiag::MAX_LISTENERS {
                        let too_many = std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("more than {} listening sockets", crate::sockdiag::MAX_LISTENERS),
                        );
                        return Err(proc_error(path, too_many));
                    }
                    listeners.push(row);
                }
                Err(e) => return Err(proc_error(path, e)),
            }
        }
    }
    Ok(listeners)
}

/// (socket inode, local port) of the LISTEN rows of a /proc/net/tcp or tcp6
/// table. Only a row's state column is looked at before the row is read: a
/// namespace after a connection flood holds 100,000 TIME_WAIT rows, which a
/// parser of every row (procfs's) takes seconds over each interval.
pub fn listen_rows(text: &str) -> impl Iterator<Item = (u64, u16)> + '_ {
    text.lines().skip(1).filter_map(listen_row)
}

/// (socket inode, local port) of one row of such a table, when it is a
/// LISTEN row.
pub fn listen_row(line: &str) -> Option<(u64, u16)> {
    const LISTEN: &str = "0A";
    let mut cols = line.split_whitespace();
    let local = cols.nth(1)?;
    if cols.nth(1)? != LISTEN {
        return None;
    }
    let port = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
    let inode = cols.nth(5)?.parse().ok()?;
    Some((inode, port))
}

/// Process start time in whole seconds since boot (stat field 22, starttime,
/// divided by the clock tick rate). Despite the name, not ticks.
pub fn start_time_ticks(proc_root: &Path, pid: u32) -> Option<u64> {
    Some(stat(proc_root, pid)?.starttime / procfs::ticks_per_second())
}

/// The parent's pid (stat field 4).
pub fn parent_pid(proc_root: &Path, pid: u32) -> Option<u32> {
    u32::try_from(stat(proc_root, pid)?.ppid).ok()
}

fn pid_dir(proc_root: &Path, pid: u32) -> PathBuf {
    proc_root.join(pid.to_string())
}

/// A process under the procfs root, through the procfs crate's readers.
fn proc_process(proc_root: &Path, pid: u32) -> Result<procfs::process::Process, DiscoveryError> {
    let dir = pid_dir(proc_root, pid);
    procfs::process::Process::new_with_root(dir.clone()).map_err(|source| DiscoveryError::Proc { path: dir, source })
}

/// /proc/PID/stat, parsed; None when the process is gone or unreadable.
fn stat(proc_root: &Path, pid: u32) -> Option<procfs::process::Stat> {
    proc_process(proc_root, pid).ok()?.stat().ok()
}

/// The inode of one of a process's namespaces (`net`, `mnt`, ...).
pub fn namespace_inode(proc_root: &Path, pid: u32, kind: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(proc_root.join(pid.to_string()).join("ns").join(kind)).ok().map(|m| m.ino())
}

/// `/proc/PID/root` when the process's mount namespace is not the agent's.
pub fn foreign_root(proc_root: &Path, pid: u32) -> Option<PathBuf> {
    let own = namespace_inode(proc_root, std::process::id(), "mnt")?;
    let theirs = namespace_inode(proc_root, pid, "mnt")?;
    (own != theirs).then(|| proc_root.join(pid.to_string()).join("root"))
}

/// Numeric entries of the procfs root, sorted. Listing /proc yields only
/// thread-group leaders; other threads are reachable by tid but not listed.
pub fn pids(proc_root: &Path) -> Vec<u32> {
    let Ok(entries) = fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries.filter_map(|e| parse_pid(e.ok()?.file_name().to_str()?)).collect();
    pids.sort_unstable();
    pids
}

/// Strict decimal: `str::parse` would also take "+12".
fn parse_pid(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|&pid| pid > 0)
}

fn read_comm(proc_root: &Path, pid: u32) -> Option<String> {
    let comm = fs::read_to_string(pid_dir(proc_root, pid).join("comm")).ok()?;
    Some(comm.strip_suffix('\n').unwrap_or(&comm).to_owned())
}

/// Inodes of the sockets a process holds open.
pub fn socket_inodes(proc_root: &Path, pid: u32) -> Result<HashSet<u64>, DiscoveryError> {
    socket_inodes_of(&proc_process(proc_root, pid)?, &pid_dir(proc_root, pid))
}

fn socket_inodes_of(process: &procfs::process::Process, dir: &Path) -> Result<HashSet<u64>, DiscoveryError> {
    let fds = process.fd().map_err(|source| DiscoveryError::Proc { path: dir.join("fd"), source })?;
    // An fd closed between listing and readlink just drops out.
    Ok(fds
        .filter_map(|fd| match fd.ok()?.target {
            FDTarget::Socket(inode) => Some(inode),
            _ => None,
        })
        .collect())
}

/// One process's directory under the procfs root.
struct Process {
    dir: PathBuf,
    /// The process's root when its mount namespace is not the agent's (a
    /// container): the files it names are opened inside it.
    root: Option<PathBuf>,
}

impl Process {
    fn new(proc_root: &Path, pid: u32) -> Self {
        Process { dir: pid_dir(proc_root, pid), root: foreign_root(proc_root, pid) }
    }

    /// argv without argv[0]. Lossy UTF-8: options are ASCII, and a path that
    /// isn't UTF-8 is rare enough not to bend the parsers around.
    fn args(&self) -> Result<Vec<String>, DiscoveryError> {
        let path = self.dir.join("cmdline");
        let raw = fs::read(&path).map_err(|source| DiscoveryError::Io { path, source })?;
        Ok(nul_separated(&raw).skip(1).map(|arg| String::from_utf8_lossy(arg).into_owned()).collect())
    }

    /// The HOME the node computes its default data dir from.
    fn home(&self) -> Option<PathBuf> {
        match fs::read(self.dir.join("environ")) {
            // Core and monerod both use "/" when HOME is unset or empty.
            Ok(environ) => Some(home_from_environ(&environ).unwrap_or_else(|| PathBuf::from("/"))),
            // Another user's environment needs ptrace access; their passwd
            // entry is what HOME is set from at login and by systemd. The
            // passwd file is the node's own (a container's), which numbers
            // users as the node's user namespace does.
            Err(_) => {
                let uid = self.uid()?;
                let uid = fs::read_to_string(self.dir.join("uid_map")).map_or(uid, |map| uid_inside(&map, uid));
                let passwd = self.read_file(Path::new(PASSWD)).unwrap_or_default();
                home_from_passwd(&passwd, uid).or_else(|| (uid == 0).then(|| PathBuf::from("/root")))
            }
        }
    }

    /// A file the node names (a config file, its passwd file) as it would
    /// read it. Lossy UTF-8: these are ASCII text files.
    fn read_file(&self, node_path: &Path) -> io::Result<String> {
        let raw = read_node_file(self.root.as_deref(), node_path, NODE_FILE_MAX_BYTES)?;
        Ok(String::from_utf8_lossy(&raw).into_owned())
    }

    /// A config file's text, or None when it can't be read. A missing file
    /// is normal (nodes run fine without one); anything else means the ports
    /// and network we report may be defaults the node doesn't use, so say so.
    fn read_config(&self, node_path: &Path) -> Option<String> {
        match self.read_file(node_path) {
            Ok(text) => Some(text),
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::debug!(path = %node_path.display(), error = %e, "node config file unreadable, assuming defaults");
                }
                None
            }
        }
    }

    /// Real uid from status, else the owner of the /proc dir (the euid).
    fn uid(&self) -> Option<u32> {
        <procfs::process::Status as procfs::FromRead>::from_file(self.dir.join("status"))
            .ok()
            .map(|status| status.ruid)
            .or_else(|| fs::metadata(&self.dir).ok().map(|meta| meta.uid()))
    }

    /// A path from the command line as the node resolved it: relative to its
    /// working directory. The cwd link needs ptrace access; without it the
    /// path stays relative, which at least shows what was given.
    fn absolute(&self, path: &str) -> PathBuf {
        let path = PathBuf::from(path);
        if path.is_absolute() {
            return path;
        }
        match fs::read_link(self.dir.join("cwd")) {
            Ok(cwd) => cwd.join(path),
            Err(_) => path,
        }
    }
}

/// Splits cmdline/environ contents, whose entries each end in NUL. An empty
/// file (kernel thread, zombie) has no entries rather than one empty one.
pub fn nul_separated(raw: &[u8]) -> impl Iterator<Item = &[u8]> {
    raw.split_inclusive(|&b| b == 0).map(|entry| entry.strip_suffix(&[0]).unwrap_or(entry))
}

pub fn home_from_environ(environ: &[u8]) -> Option<PathBuf> {
    // getenv() returns the first match, so we do too.
    let home = nul_separated(environ).find_map(|var| var.strip_prefix(b"HOME="))?;
    (!home.is_empty()).then(|| PathBuf::from(OsStr::from_bytes(home)))
}

/// A uid as the process's own user namespace numbers it, from the number
/// the agent sees: uid_map lines are `inside outside count`, with `outside`
/// in the reader's namespace. Unmapped, the number is kept (what the kernel
/// shows for it inside is the overflow uid, which no passwd entry has).
pub fn uid_inside(uid_map: &str, uid: u32) -> u32 {
    uid_map
        .lines()
        .find_map(|line| {
            let fields: Vec<u64> = line.split_whitespace().filter_map(|f| f.parse().ok()).collect();
            let &[inside, outside, count] = fields.as_slice() else { return None };
            let offset = u64::from(uid).checked_sub(outside).filter(|&o| o < count)?;
            u32::try_from(inside.checked_add(offset)?).ok()
        })
        .unwrap_or(uid)
}

pub fn home_from_passwd(passwd: &str, uid: u32) -> Option<PathBuf> {
    passwd.lines().find_map(|line| {
        // name:password:uid:gid:gecos:home:shell
        let fields: Vec<&str> = line.split(':').collect();
        let home = fields.get(5).filter(|home| !home.is_empty())?;
        (fields.get(2)?.parse::<u32>().ok()? == uid).then(|| PathBuf::from(home))
    })
}

/// Reads a file a node names, as the node would: inside `root` when the
/// node has a root of its own (a container's `/proc/PID/root`). The file is
/// the node's to make, so it is read only if it is a regular file (a FIFO
/// would block the agent, a device never end), without blocking on open,
/// and at most `limit` bytes of it.
pub fn read_node_file(root: Option<&Path>, node_path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let file = open_node_file(root, node_path)?;
    let mut contents = Vec::new();
    file.take(limit).read_to_end(&mut contents)?;
    Ok(contents)
}

/// Opens a regular file a node names, as `read_node_file` does, for a
/// reader that keeps it open and reads it in bounded steps (its log).
pub fn open_node_file(root: Option<&Path>, node_path: &Path) -> io::Result<fs::File> {
    let file = match root {
        Some(root) => open_in_root(root, node_path)?,
        None => fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(node_path)?,
    };
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    Ok(file)
}

/// Opens `node_path` with `root` as `/`. A plain `root.join(path)` would
/// not do: the kernel resolves an absolute symlink met after
/// `/proc/PID/root` against the agent's root, so a container's
/// `/home/x/.bitcoin -> /data` would lead to the host's `/data`, and a
/// container could point the agent at any host file. openat2's
/// RESOLVE_IN_ROOT resolves every symlink inside the root instead.
fn open_in_root(root: &Path, node_path: &Path) -> io::Result<fs::File> {
    let relative = node_path.strip_prefix("/").unwrap_or(node_path);
    let dir = fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH | libc::O_DIRECTORY).open(root)?;
    let c_path = CString::new(relative.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: open_how is a plain C struct; all zeros is valid (no flags).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: dir is an open descriptor, c_path a NUL-terminated string and
    // how a valid open_how whose size is passed along.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c_path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOSYS) {
            return Err(e);
        }
        // Kernels before 5.6 have no openat2: a plain join, with the
        // absolute symlink caveat above.
        return fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(root.join(relative));
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("openat2 returned an out-of-range descriptor"))?;
    // SAFETY: fd is a descriptor openat2 just opened, owned by nothing else.
    Ok(unsafe { fs::File::from_raw_fd(fd) })
}

/// `dir` joined with a network subdir, without the trailing slash that
/// joining "" would add.
fn with_subdir(dir: &Path, subdir: &str) -> PathBuf {
    if subdir.is_empty() {
        dir.to_path_buf()
    } else {
        dir.join(subdir)
    }
}

/// A port option's value; 0 means "unset" (or "disabled") to both node families.
fn parse_port(value: &str) -> Option<u16> {
    value.trim().parse().ok().filter(|&port| port != 0)
}

// ---- Bitcoin Core and Litecoin Core -------------------------------------

/// Options that Core ignores at the top level of the config file unless the
/// network is main (the "network only" ones; these are those we read).
const CORE_NETWORK_ONLY: &[&str] = &["port", "rpcport"];

/// One setting as Core's ArgsManager stores it: `section.key` split apart,
/// and `-nofoo` folded into `foo` with a false value.
#[derive(Debug)]
struct CoreSetting {
    section: Option<String>,
    key: String,
    value: String,
    negated: bool,
}

impl CoreSetting {
    fn new(section: Option<String>, key: &str, value: Option<&str>) -> Self {
        let (section, key) = match (section, key.split_once('.')) {
            (None, Some((section, key))) => (Some(section.to_owned()), key),
            (section, _) => (section, key),
        };
        let (key, value, negated) = match key.strip_prefix("no") {
            // -nofoo is foo=0; -nofoo=0 double-negates to foo=1.
            Some(key) => (key, if value.is_none_or(core_bool) { "0" } else { "1" }, true),
            None => (key, value.unwrap_or(""), false),
        };
        CoreSetting { section, key: key.to_owned(), value: value.to_owned(), negated }
    }

    /// The value of a path or number option; `-nofoo` and `foo=` unset it.
    fn text(&self) -> Option<&str> {
        (!self.negated && !self.value.is_empty()).then_some(self.value.as_str())
    }
}

/// Core's InterpretBool: a bare `-flag` (empty value) is true, anything else
/// is its leading integer as atoi reads it, so "true" is false.
fn core_bool(value: &str) -> bool {
    let value = value.trim_start();
    if value.is_empty() {
        return true;
    }
    let unsigned = value.strip_prefix(['+', '-']).unwrap_or(value);
    let digits = unsigned.bytes().take_while(u8::is_ascii_digit).count();
    unsigned[..digits].bytes().any(|b| b != b'0')
}

#[derive(Debug)]
struct CoreArgs {
    cmdline: Vec<CoreSetting>,
    config: Vec<CoreSetting>,
}

impl CoreArgs {
    fn from_cmdline(args: &[String]) -> Self {
        let mut cmdline = Vec::new();
        for arg in args {
            // Core stops parsing at the first argument that isn't an option.
            let Some(body) = arg.strip_prefix('-') else { break };
            let body = body.strip_prefix('-').unwrap_or(body);
            let setting = match body.split_once('=') {
                Some((key, value)) => CoreSetting::new(None, key, Some(value)),
                None => CoreSetting::new(None, body, None),
            };
            // Core refuses `-section.key` on the command line, so a running node has none.
            if setting.section.is_none() {
                cmdline.push(setting);
            }
        }
        CoreArgs { cmdline, config: Vec::new() }
    }

    fn on_cmdline(&self, key: &str) -> Option<&CoreSetting> {
        self.cmdline.iter().rev().find(|s| s.key == key)
    }

    /// Every value of a multi-valued option (-bind, -proxy...) as Core takes
    /// them: the command line's if it has any, else the config's [net]
    /// section and top level together.
    fn all(&self, key: &str, net: &str) -> Vec<&CoreSetting> {
        let on_cmdline: Vec<_> = self.cmdline.iter().filter(|s| s.key == key).collect();
        if !on_cmdline.is_empty() {
            return on_cmdline;
        }
        let top_level_applies = net == "main" || !CORE_NETWORK_ONLY.contains(&key);
        self.config
            .iter()
            .filter(|s| {
                s.key == key && (s.section.as_deref() == Some(net) || (s.section.is_none() && top_level_applies))
            })
            .collect()
    }

    /// Core's precedence for a setting on network `net`: the command line
    /// (last value wins), then the config's [net] section, then its top
    /// level. In the config the first value wins, which Core keeps for
    /// backwards compatibility.
    fn get(&self, key: &str, net: &str) -> Option<&CoreSetting> {
        let in_config =
            |section: Option<&str>| self.config.iter().find(|s| s.key == key && s.section.as_deref() == section);
        let top_level_applies = net == "main" || !CORE_NETWORK_ONLY.contains(&key);
        self.on_cmdline(key).or_else(|| in_config(Some(net))).or_else(|| in_config(None).filter(|_| top_level_applies))
    }

    /// The chain name Core selects. Only the command line and the config's
    /// top level count (a section can't pick the network it belongs to), and
    /// for these options the last value wins in the config too.
    fn chain(&self) -> &str {
        let get = |key: &str| {
            let config = self.config.iter().rev().filter(|s| s.section.is_none());
            self.cmdline.iter().rev().chain(config).find(|s| s.key == key).map(|s| s.value.as_str())
        };
        if let Some(chain) = get("chain").filter(|chain| !chain.is_empty()) {
            return chain;
        }
        let flags = [("regtest", "regtest"), ("signet", "signet"), ("testnet", "test"), ("testnet4", "testnet4")];
        flags.into_iter().find(|(flag, _)| get(flag).is_some_and(core_bool)).map_or("main", |(_, chain)| chain)
    }

    /// Adds the files named by `includeconf` in the chosen network's section
    /// and the top level, in the order Core reads them. Core allows one level
    /// of includes, and `-noincludeconf` on the command line turns them off.
    fn read_includes(&mut self, process: &Process, datadir: Option<&Path>) {
        if self.on_cmdline("includeconf").is_some() {
            return;
        }
        let net = self.chain().to_owned();
        let includes_in = |section: Option<&str>| -> Vec<String> {
            self.config
                .iter()
                .filter(|s| s.key == "includeconf" && !s.negated && s.section.as_deref() == section)
                .map(|s| s.value.clone())
                .collect()
        };
        let mut files = includes_in(Some(&net));
        files.extend(includes_in(None));
        for file in files {
            if let Some(text) = relative_to(datadir, &file).and_then(|path| process.read_config(&path)) {
                self.config.extend(parse_core_config(&text));
            }
        }
    }
}

/// Core's bitcoin.conf syntax: `key=value`, `#` comments anywhere on a line,
/// `[net]` section headers, and `net.key=value` as a one-line section.
fn parse_core_config(text: &str) -> Vec<CoreSetting> {
    let mut section: Option<String> = None;
    let mut settings = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.trim().to_owned());
        } else if let Some((key, value)) = line.split_once('=') {
            settings.push(CoreSetting::new(section.clone(), key.trim(), Some(value.trim())));
        }
    }
    settings
}

/// `path` as Core resolves config-relative paths: absolute as is, otherwise
/// under the data dir. Without a data dir a relative path can't be placed.
fn relative_to(datadir: Option<&Path>, path: &str) -> Option<PathBuf> {
    let path = Path::new(path);
    if path.is_absolute() {
        Some(path.to_path_buf())
    } else {
        datadir.map(|dir| dir.join(path))
    }
}

/// What a Core chain name means on disk and on the wire.
fn core_layout(chain: Chain, name: &str) -> (Network, &'static str, Option<Ports>) {
    let network = match name {
        "test" => Network::Test,
        "signet" => Network::Signet,
        "regtest" => Network::Regtest,
        // Bitcoin Core 28+'s testnet4 has no Network of its own. Test is the
        // nearest, but its dir and ports are testnet4's, not testnet3's.
        "testnet4" if chain == Chain::Bitcoin => {
            return (Network::Test, "testnet4", Some(Ports { p2p: 48333, rpc: 48332 }));
        }
        // Core refuses to start on a chain it doesn't know, so nothing else
        // reaches here from a running node.
        _ => Network::Main,
    };
    (network, chain.network_subdir(network), chain.default_ports(network))
}

fn inspect_core(process: &Process, pid: u32, chain: Chain, args: &[String]) -> NodeInfo {
    let mut settings = CoreArgs::from_cmdline(args);

    let base = match settings.on_cmdline("datadir").and_then(CoreSetting::text) {
        Some(datadir) => Some(process.absolute(datadir)),
        None => process.home().and_then(|home| chain.default_datadir(&home)),
    };

    let conf_name = if chain == Chain::Litecoin { "litecoin.conf" } else { "bitcoin.conf" };
    let conf = match settings.on_cmdline("conf") {
        // -noconf: Core reads no config file at all.
        Some(conf) if conf.negated => None,
        Some(conf) if !conf.value.is_empty() => relative_to(base.as_deref(), &conf.value),
        _ => base.as_ref().map(|base| base.join(conf_name)),
    };
    if let Some(text) = conf.and_then(|conf| process.read_config(&conf)) {
        settings.config = parse_core_config(&text);
        settings.read_includes(process, base.as_deref());
    }

    let net = settings.chain().to_owned();
    let NodeSettings { network, p2p_port, rpc_ports, proxies, onion_ports } = NodeSettings::of_core(chain, &settings);
    let (_, subdir, _) = core_layout(chain, &net);
    // A datadir= in the config moves the data, though not the config already read.
    let datadir = match settings.get("datadir", &net).and_then(CoreSetting::text) {
        Some(datadir) => Some(process.absolute(datadir)),
        None => base,
    };
    let network_datadir = datadir.as_deref().map(|dir| with_subdir(dir, subdir));
    // -debuglogfile: relative to the network's data dir; -nodebuglogfile: no file
    let log_file = match settings.get("debuglogfile", &net) {
        Some(s) if s.negated => None,
        Some(s) if !s.value.is_empty() => relative_to(network_datadir.as_deref(), &s.value),
        _ => network_datadir.as_ref().map(|dir| dir.join("debug.log")),
    };

    NodeInfo {
        pid,
        chain,
        network,
        network_datadir,
        datadir,
        p2p_ports: p2p_port.into_iter().collect(),
        rpc_ports,
        proxies,
        onion_ports,
        log_file,
    }
}

/// Core's proxies and onion listeners. `-proxy` carries every network
/// (`-proxy=ADDR=NET` one of them, Core 28+), `-onion` onion peers and
/// `-i2psam` I2P peers; a bare host gets Core's default port. Tor delivers
/// onion peers to `-bind=ADDR:PORT=onion`, or, with no -bind and -listenonion
/// on, to the network's default onion port (the P2P port + 1).
fn core_proxies(settings: &CoreArgs, net: &str, defaults: Option<Ports>) -> ProxySetup {
    let mut proxies = Vec::new();
    for (key, network, default_port) in
        [("proxy", PeerNetwork::Proxy, 9050), ("onion", PeerNetwork::Onion, 9050), ("i2psam", PeerNetwork::I2p, 7656)]
    {
        for s in settings.all(key, net).into_iter().filter(|s| !s.negated) {
            let (addr, only) = match s.value.rsplit_once('=') {
                Some((addr, n)) => (addr, Some(n)),
                None => (s.value.as_str(), None),
            };
            let network = match only {
                Some("onion" | "tor") => PeerNetwork::Onion,
                Some("i2p") => PeerNetwork::I2p,
                Some(_) => PeerNetwork::Proxy,
                None => network,
            };
            if let Some(addr) = socket_addr(addr, default_port) {
                proxies.push((addr, network));
            }
        }
    }
    let binds = settings.all("bind", net);
    let mut onion_ports: Vec<(u16, PeerNetwork)> = binds
        .iter()
        .filter_map(|s| s.value.strip_suffix("=onion"))
        .filter_map(|addr| socket_addr(addr, 0))
        .map(|a| (a.port(), PeerNetwork::Onion))
        .filter(|(port, _)| *port != 0)
        .collect();
    let listen_onion = settings.get("listenonion", net).is_none_or(|s| !s.negated && core_bool(&s.value));
    if binds.is_empty() && listen_onion {
        if let Some(p) = defaults.and_then(|d| d.p2p.checked_add(1)) {
            onion_ports.push((p, PeerNetwork::Onion));
        }
    }
    (proxies, onion_ports)
}

type ProxySetup = (Vec<(SocketAddr, PeerNetwork)>, Vec<(u16, PeerNetwork)>);

/// `IP:PORT`, `[IPv6]:PORT`, `IP` or `localhost[:PORT]` (no name lookups:
/// proxies are local by nature); `default_port` when none is given.
fn socket_addr(text: &str, default_port: u16) -> Option<SocketAddr> {
    let text = text.trim();
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Some(a);
    }
    if let Ok(ip) = text.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, default_port));
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok()?),
        None => (text, default_port),
    };
    (host == "localhost").then(|| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
}

/// What a node's command line and config file text say of its network,
/// ports, proxies and onion listeners, with no file read (includes are not
/// followed, paths are not resolved): the parsing `inspect` does, callable
/// on its own (the fuzz targets do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSettings {
    pub network: Network,
    pub p2p_port: Option<u16>,
    pub rpc_ports: Vec<u16>,
    pub proxies: Vec<(SocketAddr, PeerNetwork)>,
    pub onion_ports: Vec<(u16, PeerNetwork)>,
}

/// `args` is the command line without the program name; `config` the text
/// of the node's config file (bitcoin.conf, litecoin.conf or bitmonero.conf).
pub fn parse_node_settings(chain: Chain, args: &[String], config: &str) -> NodeSettings {
    if chain == Chain::Monero {
        let mut options = MoneroArgs::from_cmdline(args);
        options.add_config(config);
        return NodeSettings::of_monero(&options);
    }
    let mut settings = CoreArgs::from_cmdline(args);
    settings.config = parse_core_config(config);
    NodeSettings::of_core(chain, &settings)
}

impl NodeSettings {
    /// From Core's settings, command line and config merged.
    fn of_core(chain: Chain, settings: &CoreArgs) -> NodeSettings {
        let net = settings.chain();
        let (network, _, defaults) = core_layout(chain, net);
        let port = |key| settings.get(key, net).and_then(CoreSetting::text).and_then(parse_port);
        let (proxies, onion_ports) = core_proxies(settings, net, defaults);
        NodeSettings {
            network,
            p2p_port: port("port").or(defaults.map(|d| d.p2p)),
            rpc_ports: port("rpcport").or(defaults.map(|d| d.rpc)).into_iter().collect(),
            proxies,
            onion_ports,
        }
    }

    /// From monerod's options, command line and config merged.
    fn of_monero(options: &MoneroArgs) -> NodeSettings {
        let network = options.network();
        let defaults = Chain::Monero.default_ports(network);
        let rpc = options.port("rpc-bind-port").or(defaults.map(|d| d.rpc));
        // The restricted RPC server only runs when asked for; it has no default.
        let mut rpc_ports: Vec<u16> = rpc.into_iter().chain(options.port("rpc-restricted-bind-port")).collect();
        rpc_ports.dedup();
        let (proxies, onion_ports) = monero_proxies(options);
        NodeSettings {
            network,
            p2p_port: options.port("p2p-bind-port").or(defaults.map(|d| d.p2p)),
            rpc_ports,
            proxies,
            onion_ports,
        }
    }
}

// ---- Monero ---------------------------------------------------------------

/// monerod's options as boost::program_options leaves them: the command line
/// is stored before the config file and the first value stored for a key
/// wins, so the command line overrides the file.
#[derive(Debug)]
struct MoneroArgs(Vec<(String, String)>);

impl MoneroArgs {
    fn from_cmdline(args: &[String]) -> Self {
        let mut options = Vec::new();
        let mut args = args.iter().peekable();
        while let Some(arg) = args.next() {
            let Some(body) = arg.strip_prefix("--") else { continue };
            let (key, value) = match body.split_once('=') {
                Some((key, value)) => (key, value.to_owned()),
                // A running monerod has no positional arguments (they are
                // one-shot commands sent to another daemon), so a following
                // non-option can only be this option's value.
                None => (body, args.next_if(|next| !next.starts_with('-')).cloned().unwrap_or_default()),
            };
            options.push((key.to_owned(), value));
        }
        MoneroArgs(options)
    }

    /// boost's config file syntax: `key=value` with no dashes, `#` comments
    /// anywhere on a line, and `[section]` prefixing keys with `section.`.
    fn add_config(&mut self, text: &str) {
        let mut prefix = String::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                prefix = format!("{}.", name.trim());
            } else if let Some((key, value)) = line.split_once('=') {
                self.0.push((format!("{prefix}{}", key.trim()), value.trim().to_owned()));
            }
        }
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        // boost's bool spellings; a bare switch is stored as true.
        self.get(key)
            .is_some_and(|value| matches!(value.to_ascii_lowercase().as_str(), "" | "1" | "true" | "yes" | "on"))
    }

    /// monerod refuses more than one of these, so their order doesn't matter.
    fn network(&self) -> Network {
        if self.flag("testnet") {
            Network::Test
        } else if self.flag("stagenet") {
            Network::Stagenet
        } else if self.flag("regtest") {
            Network::Regtest
        } else {
            Network::Main
        }
    }

    fn port(&self, key: &str) -> Option<u16> {
        self.get(key).and_then(parse_port)
    }

    /// A path option as monerod resolved it: against the working directory
    /// at startup. --detach then chdir()s to "/", so for a detached daemon
    /// the cwd in /proc no longer anchors relative paths and they are kept
    /// as given.
    fn path(&self, process: &Process, key: &str) -> Option<PathBuf> {
        let path = self.get(key).filter(|path| !path.is_empty())?;
        Some(if self.flag("detach") { PathBuf::from(path) } else { process.absolute(path) })
    }
}

fn inspect_monero(process: &Process, pid: u32, args: &[String]) -> NodeInfo {
    let chain = Chain::Monero;
    let mut options = MoneroArgs::from_cmdline(args);
    let default_base = process.home().and_then(|home| chain.default_datadir(&home));

    // The default config file sits in the *default* data dir (plus
    // testnet/stagenet from the command line), whatever --data-dir says.
    let config = options.path(process, "config-file").or_else(|| {
        let subdir = chain.network_subdir(options.network());
        default_base.as_deref().map(|base| with_subdir(base, subdir).join("bitmonero.conf"))
    });
    if let Some(text) = config.and_then(|config| process.read_config(&config)) {
        options.add_config(&text);
    }

    let NodeSettings { network, p2p_port, rpc_ports, proxies, onion_ports } = NodeSettings::of_monero(&options);
    let datadir = options.path(process, "data-dir").or(default_base);
    // monerod appends the network subdir even to an explicit --data-dir.
    let network_datadir = datadir.as_deref().map(|dir| with_subdir(dir, chain.network_subdir(network)));
    // bitmonero.log sits in that dir unless --log-file names another
    let log_file =
        options.path(process, "log-file").or_else(|| network_datadir.as_ref().map(|d| d.join("bitmonero.log")));
    NodeInfo {
        pid,
        chain,
        network,
        network_datadir,
        datadir,
        p2p_ports: p2p_port.into_iter().collect(),
        rpc_ports,
        proxies,
        onion_ports,
        log_file,
    }
}

/// monerod's proxies: `--proxy IP:PORT` for every peer, `--tx-proxy
/// tor,IP:PORT[,...]` and `i2p,...` for transactions to onion and I2P peers;
/// `--anonymous-inbound ADDRESS.onion:PORT,IP:PORT[,MAX]` is where Tor or I2P
/// delivers inbound peers.
fn monero_proxies(options: &MoneroArgs) -> ProxySetup {
    let mut proxies = Vec::new();
    let mut onion_ports = Vec::new();
    for (key, value) in &options.0 {
        match key.as_str() {
            "proxy" => proxies.extend(socket_addr(value, 9050).map(|a| (a, PeerNetwork::Proxy))),
            "tx-proxy" => {
                let mut parts = value.split(',');
                let network = match parts.next() {
                    Some("tor") => PeerNetwork::Onion,
                    Some("i2p") => PeerNetwork::I2p,
                    _ => continue,
                };
                proxies.extend(parts.next().and_then(|a| socket_addr(a, 0)).map(|a| (a, network)));
            }
            "anonymous-inbound" => {
                let mut parts = value.split(',');
                let network = match parts.next() {
                    Some(a) if a.split(':').next().is_some_and(|h| h.ends_with(".i2p")) => PeerNetwork::I2p,
                    Some(_) => PeerNetwork::Onion,
                    None => continue,
                };
                onion_ports.extend(parts.next().and_then(|a| socket_addr(a, 0)).map(|a| (a.port(), network)));
            }
            _ => {}
        }
    }
    (proxies, onion_ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_rows_of_tcp_tables() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:4CE3 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 123456 1 0000000000000000 100 0 0 10 0
   1: 0100007F:4CE3 0100007F:D2F0 06 00000000:00000000 03:00000F2A 00000000     0        0 0 3 0000000000000000
   2: 0100007F:4CE3 0100007F:D2F2 01 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 20 4 30 10 -1
";
        assert_eq!(listen_rows(tcp).collect::<Vec<_>>(), vec![(123456, 0x4ce3)]);
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:4CE3 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 98765 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(listen_rows(tcp6).collect::<Vec<_>>(), vec![(98765, 19683)]);
    }
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A scratch dir holding a fake procfs root ("proc") next to the files
    /// its processes point at; removed on drop.
    struct Sandbox {
        root: PathBuf,
    }

    impl Sandbox {
        fn new(name: &str) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let unique =
                format!("nodescope-discovery-{}-{}-{name}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
            let root = std::env::temp_dir().join(unique);
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(root.join("proc")).unwrap();
            Sandbox { root }
        }

        fn proc_root(&self) -> PathBuf {
            self.root.join("proc")
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.root.join(rel)
        }

        fn write(&self, rel: &str, contents: &str) -> PathBuf {
            let path = self.path(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, contents).unwrap();
            path
        }

        /// A sleeping process; returns its /proc dir.
        fn process(&self, pid: u32, comm: &str, argv: &[&str], env: &[&str]) -> PathBuf {
            let dir = self.proc_root().join(pid.to_string());
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
            fs::write(dir.join("cmdline"), nul_joined(argv)).unwrap();
            fs::write(dir.join("environ"), nul_joined(env)).unwrap();
            fs::write(dir.join("stat"), stat_line(pid, comm, 'S', 1, 4242)).unwrap();
            dir
        }
    }

    impl Drop for Sandbox {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    fn nul_joined(items: &[&str]) -> Vec<u8> {
        items.iter().flat_map(|item| item.bytes().chain([0])).collect()
    }

    /// A /proc/PID/status file as this kernel writes it (our own, every
    /// line of it), with the node's name and ids.
    fn status_text(name: &str, uid: u32) -> String {
        let own = fs::read_to_string("/proc/self/status").unwrap();
        own.lines()
            .map(|line| match line.split_once(':').map(|(k, _)| k) {
                Some("Name") => format!("Name:\t{name}"),
                Some("Uid") => format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}"),
                Some("Gid") => format!("Gid:\t{uid}\t{uid}\t{uid}\t{uid}"),
                _ => line.to_owned(),
            })
            .map(|line| line + "\n")
            .collect()
    }

    /// A /proc/PID/stat line as the kernel writes it (52 fields).
    fn stat_line(pid: u32, comm: &str, state: char, ppid: u32, starttime: u64) -> String {
        format!(
            "{pid} ({comm}) {state} {ppid} {pid} {pid} 0 -1 4194560 1626 0 0 0 12 3 0 0 20 0 12 0 \
             {starttime} 1234567 890 18446744073709551615 1 1 0 0 0 0 0 4096 17575 0 0 0 17 1 0 0 0 0 0 \
             0 0 0 0 0 0 0 0\n"
        )
    }

    fn home_env(sandbox: &Sandbox, user: &str) -> String {
        format!("HOME={}", sandbox.path(&format!("home/{user}")).display())
    }

    #[test]
    fn log_files_from_debuglogfile_and_log_file() {
        let sb = Sandbox::new("log-files");
        let log_of = |pid: u32, chain: Chain, argv: &[&str]| {
            sb.process(pid, "node", argv, &["HOME=/nonexistent"]);
            inspect(&sb.proc_root(), pid, chain).unwrap().log_file
        };
        // relative to the network's data dir, as Core takes it
        assert_eq!(
            log_of(1, Chain::Litecoin, &["litecoind", "-datadir=/d", "-regtest", "-debuglogfile=logs/node.log"]),
            Some(PathBuf::from("/d/regtest/logs/node.log"))
        );
        assert_eq!(
            log_of(2, Chain::Bitcoin, &["bitcoind", "-datadir=/d", "-debuglogfile=/var/log/btc.log"]),
            Some(PathBuf::from("/var/log/btc.log"))
        );
        assert_eq!(log_of(3, Chain::Bitcoin, &["bitcoind", "-datadir=/d", "-testnet", "-nodebuglogfile"]), None);
        assert_eq!(
            log_of(4, Chain::Bitcoin, &["bitcoind", "-datadir=/d", "-testnet"]),
            Some(PathBuf::from("/d/testnet3/debug.log"))
        );
        // monerod: beside its database (no subdir for regtest), or --log-file
        assert_eq!(
            log_of(5, Chain::Monero, &["monerod", "--data-dir", "/x", "--regtest"]),
            Some(PathBuf::from("/x/bitmonero.log"))
        );
        assert_eq!(
            log_of(6, Chain::Monero, &["monerod", "--data-dir=/x", "--stagenet"]),
            Some(PathBuf::from("/x/stagenet/bitmonero.log"))
        );
        assert_eq!(
            log_of(7, Chain::Monero, &["monerod", "--detach", "--log-file", "/var/log/xmr.log"]),
            Some(PathBuf::from("/var/log/xmr.log"))
        );
    }

    #[test]
    fn bitcoind_regtest_with_relative_datadir_and_config_ports() {
        let sb = Sandbox::new("bitcoind-regtest");
        let argv = ["/usr/bin/bitcoind", "-datadir=nodes/btc", "-regtest", "-daemon", "--rpcport=19000"];
        let dir = sb.process(100, "bitcoind", &argv, &["PATH=/usr/bin", "HOME=/nonexistent"]);
        symlink(sb.path("work"), dir.join("cwd")).unwrap();
        sb.write(
            "work/nodes/btc/bitcoin.conf",
            "# regtest box\n\
             server=1\n\
             port=1111   # top level: Core ignores it off main\n\
             rpcport=2222\n\
             [test]\n\
             port=3333\n\
             [regtest]\n\
             port = 18555\n\
             rpcport=18556\n\
             port=18666\n",
        );

        let info = inspect(&sb.proc_root(), 100, Chain::Bitcoin).unwrap();
        assert_eq!(
            info,
            NodeInfo {
                pid: 100,
                chain: Chain::Bitcoin,
                network: Network::Regtest,
                datadir: Some(sb.path("work/nodes/btc")),
                network_datadir: Some(sb.path("work/nodes/btc/regtest")),
                p2p_ports: vec![18555],
                rpc_ports: vec![19000],
                proxies: Vec::new(),
                // Core's default onion port for the network: the node may bind it for Tor
                onion_ports: vec![(18445, PeerNetwork::Onion)],
                log_file: Some(sb.path("work/nodes/btc/regtest/debug.log")),
            }
        );
    }

    #[test]
    fn bitcoind_main_with_conf_includes_and_top_level_ports() {
        let sb = Sandbox::new("bitcoind-main");
        let datadir = sb.path("btc");
        let argv = ["bitcoind", &format!("-datadir={}", datadir.display()), "-conf=custom.conf"];
        sb.process(101, "bitcoind", &argv, &[]);
        sb.write("btc/custom.conf", "port=8340\nincludeconf=extra.conf\n[main]\nport=8341\n");
        sb.write("btc/extra.conf", "rpcport=8350\n");
        sb.write("btc/bitcoin.conf", "regtest=1\n");

        let info = inspect(&sb.proc_root(), 101, Chain::Bitcoin).unwrap();
        assert_eq!(info.network, Network::Main);
        assert_eq!(info.datadir.as_deref(), Some(datadir.as_path()));
        assert_eq!(info.network_datadir.as_deref(), Some(datadir.as_path()));
        // The [main] section outranks the top level.
        assert_eq!(info.p2p_ports, vec![8341]);
        assert_eq!(info.rpc_ports, vec![8350]);
    }

    #[test]
    fn bitcoind_defaults_from_home() {
        let sb = Sandbox::new("bitcoind-defaults");
        sb.process(102, "bitcoind", &["bitcoind", "-testnet"], &[&home_env(&sb, "alice")]);
        let info = inspect(&sb.proc_root(), 102, Chain::Bitcoin).unwrap();
        assert_eq!(info.network, Network::Test);
        assert_eq!(info.datadir, Some(sb.path("home/alice/.bitcoin")));
        assert_eq!(info.network_datadir, Some(sb.path("home/alice/.bitcoin/testnet3")));
        assert_eq!((info.p2p_ports, info.rpc_ports), (vec![18333], vec![18332]));

        // Core falls back to "/" when HOME is unset.
        sb.process(103, "bitcoind", &["bitcoind", "-chain=testnet4"], &["PATH=/bin"]);
        let info = inspect(&sb.proc_root(), 103, Chain::Bitcoin).unwrap();
        assert_eq!(info.datadir, Some(PathBuf::from("/.bitcoin")));
        assert_eq!(info.network_datadir, Some(PathBuf::from("/.bitcoin/testnet4")));
        assert_eq!((info.p2p_ports, info.rpc_ports), (vec![48333], vec![48332]));
    }

    #[test]
    fn unreadable_environ_falls_back_to_passwd() {
        let sb = Sandbox::new("passwd");
        let dir = sb.process(104, "bitcoind", &["bitcoind"], &[]);
        // A directory can't be read as a file, standing in for EACCES.
        fs::remove_file(dir.join("environ")).unwrap();
        fs::create_dir(dir.join("environ")).unwrap();
        fs::write(dir.join("status"), status_text("bitcoind", 0)).unwrap();
        let info = inspect(&sb.proc_root(), 104, Chain::Bitcoin).unwrap();
        let root_home = home_from_passwd(&fs::read_to_string(PASSWD).unwrap_or_default(), 0)
            .unwrap_or_else(|| PathBuf::from("/root"));
        assert_eq!(info.datadir, Some(root_home.join(".bitcoin")));
    }

    #[test]
    fn litecoind_regtest_section_port() {
        let sb = Sandbox::new("litecoind");
        sb.process(200, "litecoind", &["/opt/litecoin/bin/litecoind", "-printtoconsole"], &[&home_env(&sb, "ltc")]);
        sb.write(
            "home/ltc/.litecoin/litecoin.conf",
            "regtest=1\nport=1234\nrpcport=1235\n[main]\nport=9999\n[regtest]\nport=19555\n",
        );

        let info = inspect(&sb.proc_root(), 200, Chain::Litecoin).unwrap();
        assert_eq!(
            info,
            NodeInfo {
                pid: 200,
                chain: Chain::Litecoin,
                network: Network::Regtest,
                datadir: Some(sb.path("home/ltc/.litecoin")),
                network_datadir: Some(sb.path("home/ltc/.litecoin/regtest")),
                p2p_ports: vec![19555],
                // rpcport=1235 is top level, which Core ignores off main.
                rpc_ports: vec![19443],
                proxies: Vec::new(),
                // Core's default onion port for the network: the node may bind it for Tor
                onion_ports: vec![(19445, PeerNetwork::Onion)],
                log_file: Some(sb.path("home/ltc/.litecoin/regtest/debug.log")),
            }
        );
    }

    #[test]
    fn cmdline_chain_flag_beats_config() {
        let sb = Sandbox::new("litecoind-flag");
        sb.process(201, "litecoind", &["litecoind", "-noregtest"], &[&home_env(&sb, "ltc")]);
        sb.write("home/ltc/.litecoin/litecoin.conf", "regtest=1\ntestnet=1\n");
        let info = inspect(&sb.proc_root(), 201, Chain::Litecoin).unwrap();
        assert_eq!(info.network, Network::Test);
        assert_eq!(info.network_datadir, Some(sb.path("home/ltc/.litecoin/testnet4")));
        assert_eq!((info.p2p_ports, info.rpc_ports), (vec![19335], vec![19332]));
    }

    #[test]
    fn monerod_data_dir_and_p2p_bind_port() {
        let sb = Sandbox::new("monerod");
        let datadir = sb.path("xmr");
        let argv = [
            "monerod",
            "--testnet",
            "--data-dir",
            datadir.to_str().unwrap(),
            "--p2p-bind-port",
            "28090",
            "--rpc-restricted-bind-port=28089",
            "--non-interactive",
        ];
        sb.process(300, "monerod", &argv, &[&home_env(&sb, "xmr")]);
        // The default config lives under the default data dir, not --data-dir.
        sb.write(
            "home/xmr/.bitmonero/testnet/bitmonero.conf",
            "p2p-bind-port=1   # the command line wins\nrpc-bind-port=28100\n",
        );
        sb.write("xmr/bitmonero.conf", "rpc-bind-port=9\n");

        let info = inspect(&sb.proc_root(), 300, Chain::Monero).unwrap();
        assert_eq!(
            info,
            NodeInfo {
                pid: 300,
                chain: Chain::Monero,
                network: Network::Test,
                datadir: Some(datadir.clone()),
                network_datadir: Some(datadir.join("testnet")),
                p2p_ports: vec![28090],
                rpc_ports: vec![28100, 28089],
                proxies: Vec::new(),
                onion_ports: Vec::new(),
                log_file: Some(datadir.join("testnet/bitmonero.log")),
            }
        );
    }

    #[test]
    fn monerod_config_file_sets_data_dir_and_network() {
        let sb = Sandbox::new("monerod-config");
        let dir = sb.process(301, "monerod", &["monerod", "--config-file", "etc/monerod.conf"], &[]);
        symlink(sb.path("work"), dir.join("cwd")).unwrap();
        sb.write("work/etc/monerod.conf", "# stagenet node\ndata-dir=/var/lib/monero\nstagenet=1\n");

        let info = inspect(&sb.proc_root(), 301, Chain::Monero).unwrap();
        assert_eq!(info.network, Network::Stagenet);
        assert_eq!(info.datadir, Some(PathBuf::from("/var/lib/monero")));
        assert_eq!(info.network_datadir, Some(PathBuf::from("/var/lib/monero/stagenet")));
        assert_eq!((info.p2p_ports, info.rpc_ports), (vec![38080], vec![38081]));
    }

    #[test]
    fn detached_monerod_keeps_relative_data_dir() {
        let sb = Sandbox::new("monerod-detach");
        let dir = sb.process(302, "monerod", &["monerod", "--detach", "--data-dir=chain", "--regtest"], &[]);
        symlink("/", dir.join("cwd")).unwrap();
        let info = inspect(&sb.proc_root(), 302, Chain::Monero).unwrap();
        assert_eq!(info.network, Network::Regtest);
        assert_eq!(info.datadir, Some(PathBuf::from("chain")));
        assert_eq!(info.network_datadir, Some(PathBuf::from("chain")));
        assert_eq!((info.p2p_ports, info.rpc_ports), (vec![18080], vec![18081]));
    }

    #[test]
    fn generic_and_vanished() {
        let sb = Sandbox::new("generic");
        sb.process(400, "geth", &["geth", "--port", "30303"], &[]);
        let info = inspect(&sb.proc_root(), 400, Chain::Generic).unwrap();
        assert_eq!(
            info,
            NodeInfo {
                pid: 400,
                chain: Chain::Generic,
                network: Network::Main,
                datadir: None,
                network_datadir: None,
                p2p_ports: vec![],
                rpc_ports: vec![],
                proxies: Vec::new(),
                onion_ports: Vec::new(),
                log_file: None,
            }
        );
        let err = inspect(&sb.proc_root(), 401, Chain::Bitcoin).unwrap_err();
        assert!(matches!(&err, DiscoveryError::Io { path, .. } if path.ends_with("401/cmdline")), "{err}");
    }

    #[test]
    fn listening_ports_from_fd_and_tcp_tables() {
        let sb = Sandbox::new("ports");
        let dir = sb.process(500, "bitcoind", &["bitcoind"], &[]);
        let fd = dir.join("fd");
        fs::create_dir(&fd).unwrap();
        for (n, target) in [
            ("0", "/dev/null"),
            ("3", "socket:[1001]"),
            ("4", "socket:[1002]"),
            ("5", "socket:[1003]"),
            ("6", "socket:[1005]"),
            ("7", "anon_inode:[eventpoll]"),
            ("8", "pipe:[1004]"),
        ] {
            symlink(target, fd.join(n)).unwrap();
        }
        sb.write(
            "proc/500/net/tcp",
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
            \x20  0: 00000000:208D 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1001 1 0000000000000000 100 0 0 10 0\n\
            \x20  1: 0100007F:208C 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 9999 1 0000000000000000 100 0 0 10 0\n\
            \x20  2: 0100007F:C350 0100007F:208D 01 00000000:00000000 02:000A7E5B 00000000  1000        0 1003 2 0000000000000000 20 4 30 10 -1\n",
        );
        sb.write(
            "proc/500/net/tcp6",
            "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
            \x20  0: 00000000000000000000000000000000:208D 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1002 1 0000000000000000 100 0 0 10 0\n\
            \x20  1: 00000000000000000000000001000000:4822 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1005 1 0000000000000000 100 0 0 10 0\n",
        );

        assert_eq!(listening_ports(&sb.proc_root(), 500).unwrap(), vec![8333, 0x4822]);

        // No tcp6 table (IPv6 disabled) is not an error.
        fs::remove_file(dir.join("net/tcp6")).unwrap();
        assert_eq!(listening_ports(&sb.proc_root(), 500).unwrap(), vec![8333]);

        let err = listening_ports(&sb.proc_root(), 501).unwrap_err();
        assert!(matches!(&err, DiscoveryError::Proc { path, .. } if path.ends_with("proc/501")), "{err}");
    }

    #[test]
    fn pid_file_errors() {
        let sb = Sandbox::new("pidfile");
        let proc_root = sb.proc_root();
        sb.process(600, "bitcoind", &["bitcoind"], &[]);
        let zombie = sb.process(601, "monerod", &["monerod"], &[]);
        fs::write(zombie.join("stat"), stat_line(601, "monerod", 'Z', 1, 1)).unwrap();

        let missing = sb.path("run/missing.pid");
        let err = read_pid_file(&proc_root, &missing).unwrap_err();
        assert!(matches!(&err, DiscoveryError::Io { path, .. } if *path == missing), "{err}");
        assert!(err.to_string().starts_with(&missing.display().to_string()), "{err}");

        let expect_reason = |contents: &str, reason: &str| {
            let path = sb.write("run/node.pid", contents);
            match read_pid_file(&proc_root, &path) {
                Err(DiscoveryError::PidFile { path: p, reason: r }) => {
                    assert_eq!(p, path);
                    assert!(r.contains(reason), "{contents:?}: {r}");
                }
                other => panic!("{contents:?}: {other:?}"),
            }
        };
        expect_reason("", "empty");
        expect_reason(" \n", "empty");
        expect_reason("garbage\n", "\"garbage\" is not a process id");
        expect_reason("+600", "not a process id");
        expect_reason("0\n", "not a process id");
        expect_reason("99999999999", "not a process id");
        expect_reason("602\n", "process 602 is not running");
        expect_reason("601\n", "process 601 is not running");

        let path = sb.write("run/node.pid", "  600\n");
        assert_eq!(read_pid_file(&proc_root, &path).unwrap(), 600);
        let err = DiscoveryError::PidFile { path: path.clone(), reason: "empty".into() };
        assert_eq!(err.to_string(), format!("pid file {}: empty", path.display()));
    }

    #[test]
    fn stat_parsing_survives_hostile_comm() {
        let sb = Sandbox::new("stat");
        let dir = sb.process(700, "x", &["x"], &[]);
        fs::write(dir.join("stat"), stat_line(700, "a) (b ) S 9 9", 'R', 77, 4242)).unwrap();
        assert_eq!(start_time_ticks(&sb.proc_root(), 700), Some(4242 / procfs::ticks_per_second()));
        assert!(is_alive(&sb.proc_root(), 700));
        assert_eq!(start_time_ticks(&sb.proc_root(), 701), None);
        assert!(!is_alive(&sb.proc_root(), 701));
        assert!(!is_alive(&sb.proc_root(), 0));

        fs::write(dir.join("stat"), stat_line(700, "x", 'Z', 77, 4242)).unwrap();
        assert!(!is_alive(&sb.proc_root(), 700));
        fs::remove_file(dir.join("stat")).unwrap();
        assert!(is_alive(&sb.proc_root(), 700), "no stat: existence decides");
    }

    #[test]
    fn finds_nodes_by_comm() {
        let sb = Sandbox::new("find");
        sb.process(10, "bitcoind", &["bitcoind"], &[]);
        sb.process(2, "monerod", &["monerod"], &[]);
        sb.process(30, "bash", &["bash"], &[]);
        sb.process(31, "litecoin-qt", &["litecoin-qt"], &[]);
        sb.process(32, "bitcoind", &["bitcoind", "-regtest"], &[]);
        // Vanished between readdir and reading comm.
        fs::create_dir(sb.proc_root().join("40")).unwrap();
        fs::create_dir(sb.proc_root().join("sys")).unwrap();
        fs::create_dir(sb.proc_root().join("+5")).unwrap();
        symlink("10", sb.proc_root().join("self")).unwrap();

        assert_eq!(
            find_nodes(&sb.proc_root()),
            vec![(2, Chain::Monero), (10, Chain::Bitcoin), (31, Chain::Litecoin), (32, Chain::Bitcoin)]
        );
        assert_eq!(find_by_name(&sb.proc_root(), "bitcoind"), vec![10, 32]);
        assert_eq!(find_by_name(&sb.proc_root(), "bitcoin"), Vec::<u32>::new());
        assert!(find_nodes(&sb.path("no-such-proc")).is_empty());
    }

    #[test]
    fn core_proxies_and_onion_listeners() {
        let args: Vec<String> =
            ["-regtest", "-proxy=127.0.0.1:9050", "-i2psam=127.0.0.1", "-bind=127.0.0.1:18500=onion"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let mut settings = CoreArgs::from_cmdline(&args);
        settings.config = parse_core_config("onion=localhost:9150\nproxy=10.0.0.1:1080\n");
        let regtest = Chain::Bitcoin.default_ports(Network::Regtest);
        let (proxies, onion) = core_proxies(&settings, "regtest", regtest);
        // the command line's -proxy wins over the config's; -onion only in the config
        assert_eq!(
            proxies,
            vec![
                ("127.0.0.1:9050".parse().unwrap(), PeerNetwork::Proxy),
                ("127.0.0.1:9150".parse().unwrap(), PeerNetwork::Onion),
                ("127.0.0.1:7656".parse().unwrap(), PeerNetwork::I2p),
            ]
        );
        // an explicit onion bind replaces the default onion port
        assert_eq!(onion, vec![(18500, PeerNetwork::Onion)]);

        let per_net = CoreArgs::from_cmdline(&["-proxy=127.0.0.1:9050=onion".to_string(), "-nolistenonion".into()]);
        let (proxies, onion) = core_proxies(&per_net, "main", Chain::Bitcoin.default_ports(Network::Main));
        assert_eq!(proxies, vec![("127.0.0.1:9050".parse().unwrap(), PeerNetwork::Onion)]);
        assert!(onion.is_empty(), "-nolistenonion: {onion:?}");
        let (_, onion) =
            core_proxies(&CoreArgs::from_cmdline(&[]), "main", Chain::Bitcoin.default_ports(Network::Main));
        assert_eq!(onion, vec![(8334, PeerNetwork::Onion)]);
    }

    #[test]
    fn monero_proxies_and_anonymous_inbound() {
        let args: Vec<String> = [
            "--proxy",
            "127.0.0.1:9050",
            "--tx-proxy",
            "i2p,127.0.0.1:4447,12",
            "--anonymous-inbound",
            "abc.onion:18083,127.0.0.1:18083,25",
            "--anonymous-inbound=xyz.b32.i2p,127.0.0.1:18085",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (proxies, onion) = monero_proxies(&MoneroArgs::from_cmdline(&args));
        assert_eq!(
            proxies,
            vec![
                ("127.0.0.1:9050".parse().unwrap(), PeerNetwork::Proxy),
                ("127.0.0.1:4447".parse().unwrap(), PeerNetwork::I2p)
            ]
        );
        assert_eq!(onion, vec![(18083, PeerNetwork::Onion), (18085, PeerNetwork::I2p)]);
        assert_eq!(socket_addr("[::1]:9050", 1), Some("[::1]:9050".parse().unwrap()));
        assert_eq!(socket_addr("proxy.example:9050", 1), None, "no name lookups");
    }

    #[test]
    fn core_setting_syntax() {
        assert!(core_bool(""));
        assert!(core_bool("1"));
        assert!(core_bool("-1"));
        assert!(core_bool("2x"));
        assert!(!core_bool("0"));
        assert!(!core_bool("true"), "Core reads booleans with atoi");
        assert!(!core_bool("+0"));

        let s = CoreSetting::new(None, "noregtest", None);
        assert_eq!((s.key.as_str(), s.value.as_str(), s.negated), ("regtest", "0", true));
        let s = CoreSetting::new(None, "noregtest", Some("0"));
        assert_eq!((s.key.as_str(), s.value.as_str()), ("regtest", "1"));
        let s = CoreSetting::new(None, "test.port", Some("5"));
        assert_eq!((s.section.as_deref(), s.key.as_str(), s.value.as_str()), (Some("test"), "port", "5"));

        let conf = parse_core_config("a=1 # c\n#x=2\n\nregtest.port = 7\n[signet]\nport=8\nbad line\n");
        let flat: Vec<_> = conf.iter().map(|s| (s.section.as_deref(), s.key.as_str(), s.value.as_str())).collect();
        assert_eq!(flat, vec![(None, "a", "1"), (Some("regtest"), "port", "7"), (Some("signet"), "port", "8")]);

        let mut args = CoreArgs::from_cmdline(&["-port=1".into(), "-port=2".into(), "stop".into(), "-port=3".into()]);
        let value = |args: &CoreArgs, key| args.get(key, "main").and_then(CoreSetting::text).map(str::to_owned);
        assert_eq!(value(&args, "port").as_deref(), Some("2"), "last on the command line, up to the first non-option");
        args.config = parse_core_config("rpcport=10\nrpcport=11\nchain=signet\nchain=regtest\ndatadir=/x\n");
        assert_eq!(value(&args, "rpcport").as_deref(), Some("10"), "first in the config");
        assert_eq!(value(&args, "datadir").as_deref(), Some("/x"));
        args.cmdline.push(CoreSetting::new(None, "nodatadir", None));
        assert_eq!(value(&args, "datadir"), None, "-nodatadir unsets it");
        assert_eq!(args.chain(), "regtest", "last chain in the config");
    }

    #[test]
    fn monero_cmdline_syntax() {
        let argv: Vec<String> = ["--detach", "--log-level", "1", "--data-dir=/d", "--stagenet", "--rpc-bind-port", "1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let args = MoneroArgs::from_cmdline(&argv);
        assert!(args.flag("detach"));
        assert_eq!(args.get("log-level"), Some("1"));
        assert_eq!(args.get("data-dir"), Some("/d"));
        assert_eq!(args.network(), Network::Stagenet);
        assert_eq!(args.port("rpc-bind-port"), Some(1));
        assert!(!args.flag("testnet"));
    }

    #[test]
    fn environ_and_passwd_homes() {
        assert_eq!(home_from_environ(b"A=1\0HOME=/home/x\0HOME=/other\0"), Some(PathBuf::from("/home/x")));
        assert_eq!(home_from_environ(b"HOME=\0"), None);
        assert_eq!(home_from_environ(b""), None);
        let passwd = "root:x:0:0:root:/root:/bin/bash\n#junk\nbitcoin:x:998:998::/var/lib/bitcoind:/usr/sbin/nologin\n";
        assert_eq!(home_from_passwd(passwd, 998), Some(PathBuf::from("/var/lib/bitcoind")));
        assert_eq!(home_from_passwd(passwd, 0), Some(PathBuf::from("/root")));
        assert_eq!(home_from_passwd(passwd, 1000), None);
    }

    #[test]
    fn uid_map_ranges_past_u64_are_no_mapping() {
        assert_eq!(uid_inside("0 1000 10\n", 1003), 3);
        // inside + offset overflowed (a panic in a debug build)
        assert_eq!(uid_inside("18446744073709551615 0 10\n", 5), 5);
    }

    /// Gives `pid` a mount namespace other than the agent's, with `root` as
    /// its /proc/PID/root: two distinct files stand in for the two
    /// namespaces, as only their inode numbers are compared.
    fn containerize(sb: &Sandbox, pid: u32) -> PathBuf {
        for p in [pid, std::process::id()] {
            sb.write(&format!("proc/{p}/ns/mnt"), "");
        }
        let root = sb.proc_root().join(pid.to_string()).join("root");
        fs::create_dir_all(&root).unwrap();
        root
    }

    #[test]
    fn container_paths_are_read_inside_its_root() {
        let sb = Sandbox::new("container-core");
        let dir = sb.process(800, "litecoind", &["litecoind", "-printtoconsole"], &[]);
        // environ unreadable: HOME comes from the container's passwd, under
        // the uid the container's user namespace gives the node
        fs::remove_file(dir.join("environ")).unwrap();
        fs::create_dir(dir.join("environ")).unwrap();
        fs::write(dir.join("status"), status_text("litecoind", 101000)).unwrap();
        fs::write(dir.join("uid_map"), "         0     100000      65536\n").unwrap();
        let root = containerize(&sb, 800);
        sb.write("proc/800/root/etc/passwd", "root:x:0:0::/root:/bin/sh\nltc:x:1000:1000::/home/ltc:/bin/sh\n");
        // the image links the default data dir to a volume, absolutely
        fs::create_dir_all(root.join("home/ltc")).unwrap();
        symlink("/data", root.join("home/ltc/.litecoin")).unwrap();
        sb.write(
            "proc/800/root/data/litecoin.conf",
            "regtest=1\n[regtest]\nport=19555\nincludeconf=/etc/ltc-extra.conf\n",
        );
        sb.write("proc/800/root/etc/ltc-extra.conf", "regtest.rpcport=19556\n");

        let info = inspect(&sb.proc_root(), 800, Chain::Litecoin).unwrap();
        assert_eq!(
            info,
            NodeInfo {
                pid: 800,
                chain: Chain::Litecoin,
                network: Network::Regtest,
                // as the node names them
                datadir: Some(PathBuf::from("/home/ltc/.litecoin")),
                network_datadir: Some(PathBuf::from("/home/ltc/.litecoin/regtest")),
                p2p_ports: vec![19555],
                rpc_ports: vec![19556],
                proxies: Vec::new(),
                // Core's default onion port for the network: the node may bind it for Tor
                onion_ports: vec![(19445, PeerNetwork::Onion)],
                log_file: Some(PathBuf::from("/home/ltc/.litecoin/regtest/debug.log")),
            }
        );
    }

    #[test]
    fn container_symlinks_do_not_lead_to_host_files() {
        let sb = Sandbox::new("container-escape");
        let host_conf = sb.write("host/secret.conf", "regtest=1\n");
        sb.process(801, "bitcoind", &["bitcoind", "-datadir=/data"], &[]);
        let root = containerize(&sb, 801);
        fs::create_dir_all(root.join("data")).unwrap();
        // an absolute link in the container means the container's own path
        symlink(&host_conf, root.join("data/bitcoin.conf")).unwrap();
        let info = inspect(&sb.proc_root(), 801, Chain::Bitcoin).unwrap();
        assert_eq!(info.network, Network::Main, "read the host's file through a container's link");
        // the same path inside the container is read
        sb.write(&format!("proc/801/root{}", host_conf.display()), "testnet=1\n");
        assert_eq!(inspect(&sb.proc_root(), 801, Chain::Bitcoin).unwrap().network, Network::Test);
    }

    #[test]
    fn container_monerod_config_file_and_data_dir() {
        let sb = Sandbox::new("container-monerod");
        let argv = ["monerod", "--config-file=/etc/monero/monerod.conf", "--non-interactive"];
        sb.process(802, "monerod", &argv, &["HOME=/home/monero"]);
        containerize(&sb, 802);
        sb.write(
            "proc/802/root/etc/monero/monerod.conf",
            "data-dir=/var/lib/monero\nstagenet=1\np2p-bind-port=38090\n",
        );
        let info = inspect(&sb.proc_root(), 802, Chain::Monero).unwrap();
        assert_eq!(info.network, Network::Stagenet);
        assert_eq!(info.datadir, Some(PathBuf::from("/var/lib/monero")));
        assert_eq!(info.network_datadir, Some(PathBuf::from("/var/lib/monero/stagenet")));
        assert_eq!(info.p2p_ports, vec![38090]);

        // without --config-file: the default one under HOME's default data dir, inside the container
        sb.process(803, "monerod", &["monerod", "--testnet"], &["HOME=/home/monero"]);
        containerize(&sb, 803);
        sb.write("proc/803/root/home/monero/.bitmonero/testnet/bitmonero.conf", "rpc-bind-port=28100\n");
        let info = inspect(&sb.proc_root(), 803, Chain::Monero).unwrap();
        assert_eq!(info.datadir, Some(PathBuf::from("/home/monero/.bitmonero")));
        assert_eq!(info.rpc_ports, vec![28100]);
    }

    #[test]
    fn node_files_are_bounded_regular_files() {
        let sb = Sandbox::new("node-files");
        let root = sb.path("root");
        sb.write("root/etc/hostname", "0123456789");
        let read = |path: &str, limit| read_node_file(Some(&root), Path::new(path), limit);
        assert_eq!(read("/etc/hostname", 4).unwrap(), b"0123");
        assert_eq!(read("etc/hostname", 100).unwrap(), b"0123456789");
        assert_eq!(read("/etc", 100).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(read("/etc/missing", 100).unwrap_err().kind(), io::ErrorKind::NotFound);
        // a FIFO would block a plain open until someone writes to it
        let fifo = CString::new(root.join("etc/fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert_eq!(read("/etc/fifo", 100).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(read_node_file(None, &root.join("etc/fifo"), 100).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(read_node_file(None, &root.join("etc/hostname"), 2).unwrap(), b"01");
    }

    #[test]
    fn uids_inside_user_namespaces() {
        assert_eq!(uid_inside("         0          0 4294967295\n", 1000), 1000);
        let map = "         0     100000      65536\n     65536     300000        10\n";
        assert_eq!(uid_inside(map, 100000), 0);
        assert_eq!(uid_inside(map, 101000), 1000);
        assert_eq!(uid_inside(map, 300003), 65539);
        // outside the map: kept
        assert_eq!(uid_inside(map, 165536), 165536);
        assert_eq!(uid_inside("", 7), 7);
    }

    #[test]
    fn real_proc_smoke() {
        let proc_root = Path::new("/proc");
        let me = std::process::id();
        // A sandbox without loopback can still run the rest of the test.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").ok();
        let port = listener.as_ref().and_then(|l| l.local_addr().ok()).map(|addr| addr.port());

        let _ = find_nodes(proc_root);
        let ports = listening_ports(proc_root, me).unwrap();
        if let Some(port) = port {
            assert!(ports.contains(&port), "{port} not in {ports:?}");
        }
        // the sock_diag dump against the kernel's own TCP tables
        let process = proc_process(proc_root, me).unwrap();
        let inodes = socket_inodes_of(&process, &pid_dir(proc_root, me)).unwrap();
        let mut from_tables: Vec<u16> = listeners_from_tables(proc_root, me)
            .unwrap()
            .into_iter()
            .filter(|(inode, _)| inodes.contains(inode))
            .map(|(_, p)| p)
            .collect();
        from_tables.sort_unstable();
        from_tables.dedup();
        assert_eq!(ports, from_tables);
        drop(listener);
        assert!(is_alive(proc_root, me));
        assert!(start_time_ticks(proc_root, me).is_some());
        let comm = read_comm(proc_root, me).unwrap();
        assert!(find_by_name(proc_root, &comm).contains(&me));
        inspect(proc_root, me, Chain::Generic).unwrap();
        // Our own command line read as if we were a node: must not fail.
        inspect(proc_root, me, Chain::Bitcoin).unwrap();
        inspect(proc_root, me, Chain::Monero).unwrap();
    }
}

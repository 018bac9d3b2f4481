//! Sync state from the node's own log, without RPC: Bitcoin and Litecoin
//! Core's `UpdateTip:` and `Loaded best chain:` lines (height, progress,
//! the tip block's date) and `Leaving InitialBlockDownload`; monerod's
//! `HEIGHT N, difficulty:` lines (logged with every block added at
//! `--log-level 1` and up), `Synced N/M` and `You are now synchronized`.
//! Also whether the node is shutting down, as it says when it stops:
//! Core's `Shutdown: In progress...` and `net thread exit`, monerod's
//! `p2p net loop stopped`, `Node stopped.` and `Deinitializing p2p...`
//! (all at its default log level); a start line (Core's `... Core version
//! v...`, monerod's `Initializing cryptonote protocol...`) or a new process
//! of the node ends it.
//!
//! Each target's log is followed the way `tail -F` does, within bounds: at
//! most `READ_BUDGET` bytes per interval (a node writing faster is skipped
//! ahead to its last `READ_BUDGET` bytes), lines up to `MAX_LINE` bytes
//! (longer ones are dropped), and at first only the last `TAIL_ON_OPEN`
//! bytes of the file. A log renamed away (rotation) is read to its end,
//! then the new file at the same path from its start; a log cut shorter
//! than what was read (copy-truncate) is read again from its start. The
//! file is opened through the node's root when it lives in a container.
//!
//! Where the log says nothing the target's `source` says why (no log file,
//! unreadable, no tip line at this log level or in this format), the
//! figures stay absent, and the health rules fall back to the file classes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::metrics::Meter;
use opentelemetry::KeyValue;

use crate::chain::Chain;
use crate::net::metrics::TARGET;
use crate::scope::ScopePlan;
use crate::signal::Signal;
use crate::snapshot::Shared;
use crate::target::Target;

/// Bytes of a log read per interval and target.
pub const READ_BUDGET: u64 = 4 << 20;
/// Lines longer than this are dropped unread.
pub const MAX_LINE: usize = 16 << 10;
/// How much of an existing log is read when it is first opened.
pub const TAIL_ON_OPEN: u64 = 1 << 20;
/// Core's default -maxtipage: a tip older than this keeps it in initial
/// block download until it has once left it.
const CORE_MAX_TIP_AGE: f64 = 24.0 * 3600.0;

#[derive(Debug, Clone, Default)]
pub struct ChainSnapshot {
    pub targets: Vec<TargetChain>,
}

impl ChainSnapshot {
    pub fn target(&self, name: &str) -> Option<&TargetChain> {
        self.targets.iter().find(|t| t.name == name)
    }
}

/// What a target's log says of its chain.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct TargetChain {
    #[serde(skip)]
    pub name: String,
    /// "log" when the figures come from the log; otherwise why they do not:
    /// "no_log" (none known or the node writes none), "unreadable",
    /// "silent" (read, no tip line in it), "unsupported" (a generic node).
    pub source: &'static str,
    /// The log file as the node names it.
    pub log_file: Option<PathBuf>,
    /// Why the log gives no figures, or what it cannot give.
    pub detail: Option<String>,
    /// Height of the tip block (Core's getblockcount; monerod's
    /// get_info.height minus one).
    pub height: Option<u64>,
    /// Seconds since the tip block's time (Core) or since the node logged
    /// it (monerod, whose block lines carry no block time).
    pub tip_age_seconds: Option<f64>,
    /// Unix time the node logged its current tip (the line's own timestamp,
    /// else when the agent read it): when the chain last moved.
    pub tip_logged_unix: Option<f64>,
    /// Core's verification progress; monerod's synced height over its
    /// target (1 once synchronized).
    pub sync_progress: Option<f64>,
    pub initial_block_download: Option<bool>,
    /// The node's log says its current process is shutting down (it logged
    /// its shutdown and no start since): peers it loses now leave because
    /// it stops.
    pub shutting_down: bool,
    /// Bytes read from the log, and skipped to keep up, since the agent started.
    pub bytes_read: u64,
    pub bytes_skipped: u64,
}

/// Starts the signal: its instruments on `meter` over `snapshot`.
pub fn start(meter: &Meter, snapshot: Shared<ChainSnapshot>) -> Box<dyn Signal> {
    register(meter, snapshot.clone());
    Box::new(ChainLogSignal { snapshot, logs: HashMap::new() })
}

type Pick = fn(&TargetChain) -> Option<f64>;

fn register(meter: &Meter, snapshot: Shared<ChainSnapshot>) {
    let gauges: &[(&'static str, &'static str, &'static str, Pick)] = &[
        ("nodescope.chain.height", "", "Height of the node's tip block, from its log", |t| t.height.map(|h| h as f64)),
        (
            "nodescope.chain.tip_age",
            "s",
            "Seconds since the tip block's time (Bitcoin, Litecoin) or since the node logged it (Monero)",
            |t| t.tip_age_seconds,
        ),
        ("nodescope.chain.sync_progress", "", "Sync progress from the node's log, 0 to 1", |t| t.sync_progress),
        (
            "nodescope.chain.initial_block_download",
            "",
            "1 while the node is in initial block download (as its log shows it), else 0",
            |t| t.initial_block_download.map(|b| f64::from(u8::from(b))),
        ),
    ];
    for &(name, unit, description, pick) in gauges {
        let s = snapshot.clone();
        let b = meter.f64_observable_gauge(name).with_description(description);
        let b = if unit.is_empty() { b } else { b.with_unit(unit) };
        b.with_callback(move |o| {
            for t in &s.get().targets {
                if let Some(v) = pick(t) {
                    o.observe(v, &[KeyValue::new(TARGET, t.name.clone())]);
                }
            }
        })
        .build();
    }
}

struct ChainLogSignal {
    snapshot: Shared<ChainSnapshot>,
    logs: HashMap<String, TargetLog>,
}

impl Signal for ChainLogSignal {
    fn name(&self) -> &'static str {
        "chain"
    }

    fn collect(&mut self, targets: &[Target], _plan: &ScopePlan) {
        let now = unix_now();
        let mut out = Vec::with_capacity(targets.len());
        for t in targets {
            let log = self.logs.entry(t.name.clone()).or_insert_with(|| TargetLog::new(t.chain));
            out.push(log.collect(t, now));
        }
        self.logs.retain(|name, _| targets.iter().any(|t| &t.name == name));
        self.snapshot.publish(ChainSnapshot { targets: out });
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

/// One target's log and what it said.
struct TargetLog {
    chain: Chain,
    pid: Option<u32>,
    path: Option<PathBuf>,
    follower: Option<Follower>,
    tip: TipState,
    /// Why the log could not be read, while it cannot.
    error: Option<String>,
    /// The node last ran in a mount namespace of its own (a container):
    /// while it is down its log is not read (the same path on the host is
    /// another file, or none).
    in_container: bool,
    bytes_read: u64,
    bytes_skipped: u64,
}

/// The latest the log said.
#[derive(Debug, Default, Clone, PartialEq)]
struct TipState {
    height: Option<u64>,
    /// Unix time of the tip block (Core).
    block_time: Option<f64>,
    /// Unix time the node logged its tip (the line's timestamp, else when it was read).
    logged_at: Option<f64>,
    progress: Option<f64>,
    /// Core logged leaving initial block download (it latches).
    left_ibd: bool,
    /// monerod: synced below its target (true) or synchronized (false).
    syncing: Option<bool>,
    /// monerod logged a block it added: its log level shows every block.
    block_lines: bool,
    /// The node logged its shutdown, and no start since.
    shutting_down: bool,
}

/// What one log line says.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A new tip.
    Tip { height: u64, block_time: Option<f64>, progress: Option<f64> },
    /// Core left initial block download.
    LeftIbd,
    /// monerod synced `count` blocks of `target`.
    Synced { count: u64, target: u64 },
    /// monerod caught up with its peers.
    Synchronized,
    /// The node logged that it is stopping.
    ShuttingDown,
    /// The node logged that it is starting.
    Started,
}

impl TargetLog {
    fn new(chain: Chain) -> TargetLog {
        TargetLog {
            chain,
            pid: None,
            path: None,
            follower: None,
            tip: TipState::default(),
            error: None,
            in_container: false,
            bytes_read: 0,
            bytes_skipped: 0,
        }
    }

    fn collect(&mut self, t: &Target, now: f64) -> TargetChain {
        let mut out = TargetChain { name: t.name.clone(), source: "no_log", ..Default::default() };
        if t.chain == Chain::Generic {
            out.source = "unsupported";
            out.detail = Some("a generic node's log format is not known".into());
            return out;
        }
        if self.chain != t.chain {
            *self = TargetLog::new(t.chain);
        }
        if t.pid.is_some() && t.pid != self.pid {
            self.pid = t.pid;
            // a new process latches out of initial block download anew,
            // and is not stopping until it says so
            self.tip.left_ibd = false;
            self.tip.shutting_down = false;
            let path = log_path(t);
            if path != self.path {
                self.follower = None;
                self.tip = TipState::default();
                self.path = path;
            }
        } else if self.path.is_none() && t.pid.is_none() {
            // never seen running: the default log in its data dir
            self.path = t.datadir.as_ref().map(|d| d.join(default_log_name(t.chain)));
        }
        out.log_file = self.path.clone();
        let Some(path) = self.path.clone() else {
            out.detail = Some(match t.chain {
                Chain::Monero => "no data dir known: set targets.datadir".into(),
                _ => "the node writes no debug.log (-nodebuglogfile), or no data dir is known".into(),
            });
            return out;
        };
        if t.pid.is_some() {
            self.in_container = t.root.is_some();
        }
        if t.pid.is_some() || !self.in_container {
            self.read(t, &path, now);
        }
        self.fill(&mut out, now);
        out
    }

    /// Reads what the log gained since the last interval.
    fn read(&mut self, t: &Target, path: &Path, now: f64) {
        // a node in a container: its root, while it runs
        let root = t.pid.and(t.root.as_deref());
        let follower = self.follower.get_or_insert_with(Follower::default);
        match follower.poll(root, path, READ_BUDGET) {
            Ok(batch) => {
                if self.error.take().is_some() {
                    tracing::info!(target_name = %t.name, "chain log readable again: {}", path.display());
                }
                self.bytes_read += batch.read;
                self.bytes_skipped += batch.skipped;
                if batch.skipped > 0 {
                    tracing::debug!(target_name = %t.name, "chain log: skipped {} bytes to keep up", batch.skipped);
                }
                for line in batch.lines {
                    let event = match self.chain {
                        Chain::Monero => parse_monero_line(&line),
                        _ => parse_core_line(&line),
                    };
                    if let Some(event) = event {
                        let logged_at = line_time(&line).unwrap_or(now);
                        self.tip.apply(event, logged_at);
                    }
                }
            }
            Err(e) => {
                let reason = e.to_string();
                if self.error.as_deref() != Some(reason.as_str()) {
                    tracing::warn!(target_name = %t.name, "chain log unreadable: {}: {reason}", path.display());
                }
                self.error = Some(reason);
            }
        }
    }

    fn fill(&self, out: &mut TargetChain, now: f64) {
        out.bytes_read = self.bytes_read;
        out.bytes_skipped = self.bytes_skipped;
        let tip = &self.tip;
        out.shutting_down = tip.shutting_down;
        if let Some(e) = &self.error {
            out.source = "unreadable";
            out.detail = Some(e.clone());
            if tip.height.is_none() {
                return;
            }
        }
        let Some(height) = tip.height else {
            out.source = "silent";
            out.detail = Some(match self.chain {
                Chain::Monero => format!(
                    "no block or sync line in the last {} KiB read: monerod logs each block it adds at --log-level 1 \
                     and up, and at level 0 only while it syncs",
                    TAIL_ON_OPEN >> 10
                ),
                _ => format!(
                    "no UpdateTip line in the last {} KiB read: a log written in another format, or no block connected since",
                    TAIL_ON_OPEN >> 10
                ),
            });
            return;
        };
        if out.source != "unreadable" {
            out.source = "log";
        }
        out.height = Some(height);
        out.tip_logged_unix = tip.logged_at;
        match self.chain {
            Chain::Monero => {
                if tip.block_lines {
                    out.tip_age_seconds = tip.logged_at.map(|at| (now - at).max(0.0));
                } else if tip.syncing == Some(false) {
                    // at level 0 a synchronized monerod logs no new block
                    out.detail = Some(
                        "monerod logs new blocks at --log-level 1 and up: the height is the one it synchronized at"
                            .into(),
                    );
                } else {
                    out.tip_age_seconds = tip.logged_at.map(|at| (now - at).max(0.0));
                }
                out.sync_progress = tip.progress;
                out.initial_block_download = tip.syncing;
            }
            _ => {
                let age = tip.block_time.map(|at| (now - at).max(0.0));
                out.tip_age_seconds = age;
                out.sync_progress = tip.progress;
                out.initial_block_download = Some(!tip.left_ibd && age.is_some_and(|a| a > CORE_MAX_TIP_AGE));
            }
        }
    }
}

impl TipState {
    fn apply(&mut self, event: Event, logged_at: f64) {
        match event {
            Event::Tip { height, block_time, progress } => {
                self.height = Some(height);
                self.logged_at = Some(logged_at);
                if let Some(at) = block_time {
                    self.block_time = Some(at);
                    // Core leaves initial block download for good once its tip is
                    // younger than its max tip age; a tip logged that young says
                    // so too, when the "Leaving InitialBlockDownload" line is older
                    // than the tail read (the agent restarted since)
                    if (logged_at - at).abs() < CORE_MAX_TIP_AGE {
                        self.left_ibd = true;
                    }
                }
                if progress.is_some() {
                    self.progress = progress;
                } else if self.syncing == Some(false) {
                    self.progress = Some(1.0);
                }
                if block_time.is_none() {
                    self.block_lines = true;
                }
            }
            Event::LeftIbd => self.left_ibd = true,
            Event::Synced { count, target } => {
                // monerod counts blocks: the tip's height is one less
                if !self.block_lines || self.height.is_none_or(|h| h < count.saturating_sub(1)) {
                    self.height = count.checked_sub(1);
                    self.logged_at = Some(logged_at);
                }
                if target > 0 {
                    self.progress = Some((count as f64 / target as f64).min(1.0));
                }
                self.syncing = Some(count < target);
            }
            Event::Synchronized => {
                self.syncing = Some(false);
                self.progress = Some(1.0);
            }
            Event::ShuttingDown => self.shutting_down = true,
            Event::Started => self.shutting_down = false,
        }
    }
}

fn default_log_name(chain: Chain) -> &'static str {
    match chain {
        Chain::Monero => "bitmonero.log",
        _ => "debug.log",
    }
}

/// The log as the node names it: from its command line and config
/// (-debuglogfile, --log-file), else the default in its data dir.
fn log_path(t: &Target) -> Option<PathBuf> {
    if let Some(pid) = t.pid {
        if let Ok(info) = crate::discovery::inspect(Path::new("/proc"), pid, t.chain) {
            // discovery found the data dir the node uses: trust its log path
            // (None: the node writes no log file)
            if info.network_datadir.is_some() || info.log_file.is_some() {
                return info.log_file;
            }
        }
    }
    t.datadir.as_ref().map(|d| d.join(default_log_name(t.chain)))
}

// ---- reading -----------------------------------------------------------

/// A log followed across rotation and truncation.
#[derive(Default)]
struct Follower {
    open: Option<OpenLog>,
}

struct OpenLog {
    file: File,
    id: (u64, u64),
    /// Where the next unread line starts.
    offset: u64,
}

/// What one poll read.
#[derive(Debug, Default)]
struct Batch {
    lines: Vec<String>,
    read: u64,
    skipped: u64,
}

impl Follower {
    /// The complete lines written since the last poll, at most `budget` bytes.
    fn poll(&mut self, root: Option<&Path>, path: &Path, budget: u64) -> std::io::Result<Batch> {
        let mut batch = Batch::default();
        let at_path = crate::discovery::open_node_file(root, path);
        let at_path = match at_path {
            Ok(file) => {
                let m = file.metadata()?;
                Some((file, (m.dev(), m.ino())))
            }
            // renamed away and not made again yet: the old file still gets the lines
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.open.is_some() => None,
            Err(e) => return Err(e),
        };
        match (self.open.as_mut(), at_path) {
            (None, Some((file, id))) => {
                let size = file.metadata()?.len();
                let mut log = OpenLog { file, id, offset: size.saturating_sub(TAIL_ON_OPEN) };
                if log.offset > 0 {
                    // the first line read would be cut: start after it
                    log.skip_partial_line()?;
                }
                self.open = Some(log);
            }
            (Some(log), Some((file, id))) if log.id != id => {
                // rotated: the rest of the old file, then the new one from its start
                log.read_lines(budget, &mut batch)?;
                *log = OpenLog { file, id, offset: 0 };
            }
            _ => {}
        }
        let Some(log) = self.open.as_mut() else { return Ok(batch) };
        let left = budget.saturating_sub(batch.read);
        log.read_lines(left, &mut batch)?;
        Ok(batch)
    }
}

impl OpenLog {
    fn skip_partial_line(&mut self) -> std::io::Result<()> {
        self.file.seek(SeekFrom::Start(self.offset))?;
        let mut buf = vec![0u8; MAX_LINE];
        let n = read_full(&mut self.file, &mut buf)?;
        match buf[..n].iter().position(|&b| b == b'\n') {
            Some(i) => self.offset += i as u64 + 1,
            None => self.offset += n as u64,
        }
        Ok(())
    }

    /// Reads complete lines from `offset`, at most `budget` bytes; a file
    /// shorter than `offset` was truncated and is read from its start, and
    /// one that grew by more than `budget` is read from its last `budget` bytes.
    fn read_lines(&mut self, budget: u64, batch: &mut Batch) -> std::io::Result<()> {
        let size = self.file.metadata()?.len();
        if size < self.offset {
            self.offset = 0;
        }
        if size - self.offset > budget {
            let skipped_from = self.offset;
            self.offset = size - budget;
            self.skip_partial_line()?;
            batch.skipped += self.offset - skipped_from;
        }
        let want = (size.saturating_sub(self.offset)).min(budget) as usize;
        if want == 0 {
            return Ok(());
        }
        self.file.seek(SeekFrom::Start(self.offset))?;
        let mut buf = vec![0u8; want];
        let n = read_full(&mut self.file, &mut buf)?;
        buf.truncate(n);
        // only complete lines; a line still being written is read next time
        let end = match buf.iter().rposition(|&b| b == b'\n') {
            Some(i) => i + 1,
            // no newline in a full line's worth: a line too long to keep
            None if n >= MAX_LINE => n,
            None => 0,
        };
        for raw in buf[..end].split(|&b| b == b'\n') {
            if raw.is_empty() || raw.len() > MAX_LINE || raw.contains(&0) {
                continue;
            }
            batch.lines.push(String::from_utf8_lossy(raw).into_owned());
        }
        batch.read += end as u64;
        self.offset += end as u64;
        Ok(())
    }
}

fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

// ---- parsing -----------------------------------------------------------

/// The value after ` key=` in a Core log line, without quotes.
fn core_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    let value = rest.split(' ').next()?;
    Some(value.trim_matches('\''))
}

/// Core's `UpdateTip: new best=... height=N ... date='...' progress=P ...`
/// and `Loaded best chain: hashBestChain=... height=N date=... progress=P`,
/// whatever precedes them (timestamps, thread names, source locations).
pub fn parse_core_line(line: &str) -> Option<Event> {
    if line.contains("Leaving InitialBlockDownload") {
        return Some(Event::LeftIbd);
    }
    // Shutdown() logs this first, before it stops the network threads
    // (which close every peer); `net thread exit` follows
    if line.contains("Shutdown: In progress") || line.ends_with(" net thread exit") {
        return Some(Event::ShuttingDown);
    }
    // the first line a starting node logs: "Bitcoin Core version v25.0.0 (release build)"
    if line.contains(" Core version v") {
        return Some(Event::Started);
    }
    let body = match line.find("UpdateTip: ").or_else(|| line.find("Loaded best chain: ")) {
        Some(i) => &line[i..],
        None => return None,
    };
    let height = core_field(body, "height")?.parse().ok()?;
    let block_time = core_field(body, "date").and_then(unix_time);
    let progress = core_field(body, "progress").and_then(|p| p.parse::<f64>().ok()).filter(|p| p.is_finite());
    Some(Event::Tip { height, block_time, progress })
}

/// monerod's `HEIGHT N, difficulty:` (one line of its block-added record),
/// `Synced N/M` and `You are now synchronized with the network`.
pub fn parse_monero_line(line: &str) -> Option<Event> {
    // what monerod logs at level 0 as it stops (exit, stop_daemon, SIGTERM)
    const STOPPING: &[&str] = &["p2p net loop stopped", "Node stopped.", "Deinitializing p2p...", "Stop signal sent"];
    if STOPPING.iter().any(|s| line.ends_with(s)) {
        return Some(Event::ShuttingDown);
    }
    if line.ends_with("Initializing cryptonote protocol...") {
        return Some(Event::Started);
    }
    if let Some(i) = line.find("HEIGHT ") {
        let rest = &line[i + 7..];
        let digits = rest.split(',').next()?;
        if rest[digits.len()..].starts_with(", difficulty:") {
            return Some(Event::Tip { height: digits.trim().parse().ok()?, block_time: None, progress: None });
        }
    }
    if let Some(i) = line.find("Synced ") {
        let rest = &line[i + 7..];
        let pair = rest.split([' ', '\t']).next()?;
        let (count, target) = pair.split_once('/')?;
        return Some(Event::Synced { count: count.parse().ok()?, target: target.parse().ok()? });
    }
    if line.contains("You are now synchronized with the network") {
        return Some(Event::Synchronized);
    }
    None
}

/// The timestamp a log line starts with: Core's `2024-01-02T03:04:05Z`
/// (or with microseconds), monerod's `2024-01-02 03:04:05.678` (UTC).
pub fn line_time(line: &str) -> Option<f64> {
    let head = line.get(..line.len().min(32))?;
    let end = head.find(['Z', '\t']).or_else(|| head.match_indices(' ').nth(1).map(|(i, _)| i))?;
    unix_time(&head[..end])
}

/// `YYYY-MM-DD[T ]HH:MM:SS[.fraction][Z]` as UTC, to unix seconds.
pub fn unix_time(s: &str) -> Option<f64> {
    let at = humantime_serde::re::humantime::parse_rfc3339_weak(s.trim()).ok()?;
    Some(at.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const UPDATE_TIP: &str = "2026-11-29T14:36:48Z UpdateTip: new best=530827f38f93b43ed12af0b3ad25a288dc02ed74d6d7857862df51fc56c416f9 height=163 version=0x20000000 log2_work=8.366322 tx=164 date='2026-11-29T14:36:40Z' progress=1.000000 cache=0.0MiB(163txo)";

    #[test]
    fn core_lines() {
        let tip = parse_core_line(UPDATE_TIP).unwrap();
        let at = unix_time("2026-11-29T14:36:40Z").unwrap();
        assert_eq!(tip, Event::Tip { height: 163, block_time: Some(at), progress: Some(1.0) });
        // thread names and source locations before the message
        let with_thread = format!("2026-11-29T14:36:48Z [msghand] [validation.cpp:2500] {}", &UPDATE_TIP[21..]);
        assert_eq!(parse_core_line(&with_thread), Some(tip));
        let loaded =
            "2026-11-29T14:36:48Z Loaded best chain: hashBestChain=5308 height=12 date=2011-02-02T23:16:42Z progress=0.5";
        assert_eq!(
            parse_core_line(loaded),
            Some(Event::Tip { height: 12, block_time: unix_time("2011-02-02T23:16:42Z"), progress: Some(0.5) })
        );
        assert_eq!(parse_core_line("x Leaving InitialBlockDownload (latching to false)"), Some(Event::LeftIbd));
        assert_eq!(parse_core_line("2026-11-29T14:36:48Z init message: Loading block index..."), None);
        assert_eq!(parse_core_line("UpdateTip: new best=00 height=x"), None);
    }

    #[test]
    fn monero_lines() {
        let line = "2026-11-29 14:37:37.645\t[RPC1]\tINFO\tblockchain\tsrc/cryptonote_core/blockchain.cpp:4524\tHEIGHT 5, difficulty:\t1";
        assert_eq!(parse_monero_line(line), Some(Event::Tip { height: 5, block_time: None, progress: None }));
        assert_eq!(line_time(line), unix_time("2026-11-29 14:37:37.645"));
        let synced = "2026-11-29 14:37:37.645\t[P2P1]\tINFO\tglobal\tsrc/cryptonote_protocol/cryptonote_protocol_handler.inl:1690\tSynced 1200/3000 (40%, 1800 left)";
        assert_eq!(parse_monero_line(synced), Some(Event::Synced { count: 1200, target: 3000 }));
        assert_eq!(
            parse_monero_line("x\tYou are now synchronized with the network. You may now start monero-wallet-cli."),
            Some(Event::Synchronized)
        );
        assert_eq!(parse_monero_line("x\tHEIGHT of something"), None);

        let mut tip = TipState::default();
        tip.apply(Event::Synced { count: 1200, target: 3000 }, 10.0);
        assert_eq!((tip.height, tip.progress, tip.syncing), (Some(1199), Some(0.4), Some(true)));
        tip.apply(Event::Synchronized, 11.0);
        tip.apply(Event::Tip { height: 3000, block_time: None, progress: None }, 12.0);
        assert_eq!(
            (tip.height, tip.progress, tip.syncing, tip.logged_at),
            (Some(3000), Some(1.0), Some(false), Some(12.0))
        );
    }

    #[test]
    fn times() {
        assert_eq!(unix_time("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(unix_time("2011-02-02T23:16:42Z"), Some(1296688602.0));
        assert_eq!(unix_time("2024-02-29 12:00:00.500"), Some(1709208000.5));
        assert_eq!(line_time("2026-11-29T14:36:48.123456Z foo"), unix_time("2026-11-29T14:36:48.123456Z"));
        assert_eq!(line_time("no time here"), None);
        assert_eq!(unix_time("2024-13-01T00:00:00Z"), None);
        // years past four digits overflowed the day count (a panic in a debug build)
        assert_eq!(unix_time("99999999999999999-01-01T00:00:00Z"), None);
        assert_eq!(unix_time("-9223372036854775807-01-01 00:00:00"), None);
        assert_eq!(unix_time("2024-01-01T-1:00:00Z"), None);
        // the fraction is digits: an exponent made the time infinite (found by the chainlog fuzz target)
        assert_eq!(unix_time("1999-02-28 23:59:60.999E999"), None);
        assert_eq!(line_time("1999-02-28 23:59:60.999E999 Loaded best chain: height=1"), None);
        assert_eq!(unix_time("2024-01-01T00:00:00.5e3Z"), None);
    }

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn append(path: &Path, text: &str) {
        std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap().write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn follows_rotation_truncation_and_partial_lines() {
        let dir = Tmp(std::env::temp_dir().join(format!("nodescope-chainlog-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).unwrap();
        let log = dir.0.join("debug.log");
        append(&log, "old 1\nold 2\n");
        let mut f = Follower::default();
        // an existing log is read from its tail (all of this small one)
        assert_eq!(f.poll(None, &log, 1 << 20).unwrap().lines, ["old 1", "old 2"]);
        append(&log, "a\nb (being writ");
        assert_eq!(f.poll(None, &log, 1 << 20).unwrap().lines, ["a"]);
        append(&log, "ten)\n");
        assert_eq!(f.poll(None, &log, 1 << 20).unwrap().lines, ["b (being written)"]);
        // renamed away: the lines still written to it, then the new file
        std::fs::rename(&log, dir.0.join("debug.log.1")).unwrap();
        append(&dir.0.join("debug.log.1"), "late\n");
        assert_eq!(f.poll(None, &log, 1 << 20).unwrap().lines, ["late"]);
        append(&log, "new 1\n");
        assert_eq!(f.poll(None, &log, 1 << 20).unwrap().lines, ["new 1"]);
        // copied and truncated in place
        std::fs::OpenOptions::new().write(true).open(&log).unwrap().set_len(0).unwrap();
        append(&log, "n2\n");
        assert_eq!(f.poll(None, &log, 1 << 20).unwrap().lines, ["n2"]);
        // more than the budget: skipped ahead to whole lines within it
        let many: String = (0..100).map(|i| format!("line {i:03}\n")).collect();
        append(&log, &many);
        let b = f.poll(None, &log, 50).unwrap();
        assert_eq!(b.lines, ["line 095", "line 096", "line 097", "line 098", "line 099"]);
        assert_eq!(b.skipped + b.read, many.len() as u64);
        // a line too long is dropped, the next one kept
        append(&log, &format!("{}\nshort\n", "x".repeat(MAX_LINE + 10)));
        let lines: Vec<String> = (0..4).flat_map(|_| f.poll(None, &log, 1 << 20).unwrap().lines).collect();
        assert_eq!(lines, ["short"]);
        // gone and never opened: an error to report
        assert!(Follower::default().poll(None, &dir.0.join("none.log"), 100).is_err());
    }

    #[test]
    fn a_container_nodes_log_is_read_through_its_root_and_not_while_down() {
        let dir = Tmp(std::env::temp_dir().join(format!("nodescope-chainlog-root-{}", std::process::id())));
        // the node's path: in its root, and the same path on the host, another file
        let node_path = PathBuf::from(format!("/nodescope-chainlog-{}/debug.log", std::process::id()));
        let root = dir.0.join("root");
        let in_root = root.join(node_path.strip_prefix("/").unwrap());
        std::fs::create_dir_all(in_root.parent().unwrap()).unwrap();
        append(&in_root, &format!("{UPDATE_TIP}\n"));
        let host = Tmp(node_path.parent().unwrap().to_path_buf());
        std::fs::create_dir_all(&host.0).unwrap();
        append(&node_path, &format!("{}\n", UPDATE_TIP.replace("height=163", "height=999")));

        let mut t = Target::litecoin_for_tests("ltc", Some(1), &[], &[], &[]);
        t.root = Some(root.clone());
        let mut log = TargetLog::new(Chain::Litecoin);
        // the process and its log path as discovery would have found them
        log.pid = Some(1);
        log.path = Some(node_path.clone());
        assert_eq!(log.collect(&t, 0.0).height, Some(163));
        t.pid = None;
        t.root = None;
        let out = log.collect(&t, 0.0);
        assert_eq!(out.height, Some(163), "read the host's file of the same name");
        assert_eq!(out.log_file, Some(node_path));
    }

    #[test]
    fn shutting_down_from_the_log_until_a_start_or_a_new_process() {
        let shutdown = "2026-11-29T16:50:36Z Shutdown: In progress...";
        assert_eq!(parse_core_line(shutdown), Some(Event::ShuttingDown));
        assert_eq!(parse_core_line("2026-11-29T16:50:36Z net thread exit"), Some(Event::ShuttingDown));
        assert_eq!(parse_core_line("2026-11-29T16:50:36Z net thread start"), None);
        let version = "2026-11-29T16:50:30Z Litecoin Core version v0.21.2.1-gfce5d459f0 (release build)";
        assert_eq!(parse_core_line(version), Some(Event::Started));
        let xmr = |msg: &str| format!("2026-11-29 16:50:59.392\t[SRV_MAIN]\tINFO\tglobal\tsrc/daemon/p2p.h:81\t{msg}");
        assert_eq!(parse_monero_line(&xmr("p2p net loop stopped")), Some(Event::ShuttingDown));
        assert_eq!(parse_monero_line(&xmr("Node stopped.")), Some(Event::ShuttingDown));
        assert_eq!(parse_monero_line(&xmr("Initializing cryptonote protocol...")), Some(Event::Started));

        let dir = Tmp(std::env::temp_dir().join(format!("nodescope-chainlog-stop-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).unwrap();
        let path = dir.0.join("debug.log");
        append(&path, &format!("{version}\n{UPDATE_TIP}\n"));
        // pids no process has (above pid_max): the log is the data dir's debug.log
        let mut t = Target::litecoin_for_tests("ltc", Some(4_194_401), &[], &[], &[]);
        t.datadir = Some(dir.0.clone());
        let mut log = TargetLog::new(Chain::Litecoin);
        assert!(!log.collect(&t, 0.0).shutting_down);
        append(&path, &format!("{shutdown}\n"));
        let out = log.collect(&t, 0.0);
        assert!(out.shutting_down);
        assert_eq!(out.height, Some(163), "the tip stays known");
        // the node started again: a new process is not stopping
        t.pid = Some(4_194_402);
        assert!(!log.collect(&t, 0.0).shutting_down);
        // its shutdown and then a start line read in one go (the agent was away)
        append(&path, &format!("{shutdown}\n"));
        assert!(log.collect(&t, 0.0).shutting_down);
        append(&path, &format!("{version}\n"));
        assert!(!log.collect(&t, 0.0).shutting_down);
    }

    #[test]
    fn core_ibd_from_the_tip_age_and_the_latch() {
        let mut log = TargetLog::new(Chain::Litecoin);
        log.tip.apply(parse_core_line(UPDATE_TIP).unwrap(), 0.0);
        let at = unix_time("2026-11-29T14:36:40Z").unwrap();
        let mut out = TargetChain::default();
        log.fill(&mut out, at + 10.0);
        assert_eq!((out.source, out.height, out.tip_age_seconds), ("log", Some(163), Some(10.0)));
        assert_eq!(out.initial_block_download, Some(false));
        log.fill(&mut out, at + 2.0 * 86400.0);
        assert_eq!(out.initial_block_download, Some(true));
        log.tip.apply(Event::LeftIbd, 0.0);
        log.fill(&mut out, at + 2.0 * 86400.0);
        assert_eq!(out.initial_block_download, Some(false));

        // no "Leaving InitialBlockDownload" in what was read, but a tip logged
        // within a day of its block's time: the node had left it, and a stall
        // of two days is a stall, not initial sync
        let mut log = TargetLog::new(Chain::Litecoin);
        log.tip.apply(parse_core_line(UPDATE_TIP).unwrap(), at + 5.0);
        log.fill(&mut out, at + 2.0 * 86400.0);
        assert_eq!(out.initial_block_download, Some(false));
        // an old block logged now (the node syncing) does not latch it
        let mut log = TargetLog::new(Chain::Litecoin);
        log.tip.apply(parse_core_line(UPDATE_TIP).unwrap(), at + 3.0 * 86400.0);
        log.fill(&mut out, at + 3.0 * 86400.0);
        assert_eq!(out.initial_block_download, Some(true));
    }
}

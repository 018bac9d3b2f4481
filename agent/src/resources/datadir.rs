//! The data dir's own size, counted as `du -sb` counts it, kept current
//! without walking the whole tree every interval.
//!
//! A mainnet data dir holds hundreds of gigabytes in tens of thousands of
//! files; stat'ing all of them every few seconds would load the node's disk
//! for nothing, since almost all of them never change. So:
//!
//! - First walk: directories are listed breadth-first, at most
//!   `ops_per_pass` filesystem operations per pass (one pass per interval),
//!   resuming where the last pass stopped, inside a directory if need be. The
//!   size is unknown (None) until the walk is complete.
//! - Then follow changes cheaply. A directory's mtime moves when an entry is
//!   added, removed or renamed, so each pass stats the directories and lists
//!   again those that changed; the listing stats only names that are new or
//!   whose inode changed (readdir returns the inode without a stat, so a file
//!   replaced by rename is seen). The most recently modified files (modified
//!   within `HOT_WINDOW_SECS` when last seen, at most a quarter of the budget
//!   of them, the stalest dropped first) are re-stat'ed every pass: those are
//!   the ones a node appends to (the newest blk/rev file, LevelDB logs,
//!   LMDB's data.mdb, debug.log).
//! - Every `rescan` period, every entry is stat'ed again (paced by the same
//!   budget), which corrects what the above misses: an old file rewritten in
//!   place without its directory changing.
//!
//! Bounds: `ops_per_pass` operations per pass (a stat, an opendir, or every
//! `ENTRIES_PER_OP` directory entries read each count one; the only overshoot
//! is a stat that `file_type` makes on filesystems without d_type); at most
//! `max_entries` files and directories remembered per data dir: past that
//! the tree is dropped, the size is unknown and the walk is tried again after
//! `rescan`.
//!
//! `du -sb` semantics: apparent sizes (st_size) of every entry including the
//! directories themselves, symlinks not followed (their own size counts),
//! each multiply-linked inode once.
//!
//! A node in a container is reached through `/proc/PID/root`, a path that
//! changes with every restart of the node while the directory stays the
//! same. The watcher keeps each tree by target and the data dir as the node
//! names it, and moves it to the new path (`DirTracker::rebase`) rather than
//! walking it again. A root that goes out of reach mid-pass (the node
//! stopped) leaves the tree as it was; while a container node is down its
//! data dir is not asked for at all, so a dead pid's path is not read again.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A file modified this recently (when last seen) is re-stat'ed every pass.
const HOT_WINDOW_SECS: i64 = 600;
/// Reading this many directory entries counts as one operation (getdents
/// returns them in batches).
const ENTRIES_PER_OP: u64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkLimits {
    pub ops_per_pass: u64,
    pub max_entries: u64,
    pub rescan: Duration,
}

/// What identifies a directory's contents at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DirStamp {
    ino: u64,
    mtime_sec: i64,
    mtime_nsec: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileState {
    dev: u64,
    ino: u64,
    size: u64,
    nlink: u64,
    /// (seconds, nanoseconds)
    mtime: (i64, i64),
}

impl FileState {
    fn from_meta(m: &fs::Metadata) -> FileState {
        FileState { dev: m.dev(), ino: m.ino(), size: m.len(), nlink: m.nlink(), mtime: (m.mtime(), m.mtime_nsec()) }
    }
}

#[derive(Debug, Default)]
struct DirState {
    stamp: Option<DirStamp>,
    own_size: u64,
    files: HashMap<OsString, FileState>,
    subdirs: HashSet<OsString>,
}

/// A directory being listed, kept across passes when the budget runs out.
struct Listing {
    dir: PathBuf,
    /// Stat every entry, not only new or replaced ones (the rescan).
    force: bool,
    entries: fs::ReadDir,
    seen: HashSet<OsString>,
    read: u64,
}

/// One data dir's tracked tree.
pub struct DirTracker {
    root: PathBuf,
    limits: WalkLimits,
    dirs: HashMap<PathBuf, DirState>,
    /// New directories and ones whose mtime moved.
    changed: VecDeque<PathBuf>,
    /// The periodic full rescan.
    rescan_queue: VecDeque<PathBuf>,
    listing: Option<Listing>,
    /// Recently modified files by mtime, re-stat'ed every pass; `hot_mtime`
    /// indexes it by path.
    hot: BTreeSet<((i64, i64), PathBuf)>,
    hot_mtime: HashMap<PathBuf, (i64, i64)>,
    dir_cursor: usize,
    /// Sum of apparent sizes; signed so a transient miscount cannot wrap.
    total: i128,
    /// Multiply-linked inodes: (size, names seen pointing at it).
    links: HashMap<(u64, u64), (u64, u64)>,
    entries: u64,
    walked: bool,
    last_rescan: Instant,
    over_limit_since: Option<Instant>,
    operations: u64,
    error: Option<String>,
}

impl DirTracker {
    pub fn new(root: &Path, limits: WalkLimits) -> DirTracker {
        DirTracker {
            // "/a/b/" and "/a/b" are one directory; keys must compare equal.
            root: root.components().collect(),
            limits,
            dirs: HashMap::new(),
            changed: VecDeque::new(),
            rescan_queue: VecDeque::new(),
            listing: None,
            hot: BTreeSet::new(),
            hot_mtime: HashMap::new(),
            dir_cursor: 0,
            total: 0,
            links: HashMap::new(),
            entries: 0,
            walked: false,
            last_rescan: Instant::now(),
            over_limit_since: None,
            operations: 0,
            error: None,
        }
    }

    /// `du -sb` of the data dir; None until the first walk is complete, or
    /// when the data dir is missing or has more than `max_entries` entries.
    pub fn size_bytes(&self) -> Option<u64> {
        (self.walked && self.over_limit_since.is_none() && self.error.is_none()).then(|| self.total.max(0) as u64)
    }

    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Filesystem operations spent since the tracker started.
    pub fn operations(&self) -> u64 {
        self.operations
    }

    pub fn over_limit(&self) -> bool {
        self.over_limit_since.is_some()
    }

    /// Why the size is unknown, when it is for a reason other than the walk
    /// still running.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// One bounded step of work; call once per interval.
    pub fn pass(&mut self) {
        if let Some(since) = self.over_limit_since {
            if since.elapsed() < self.limits.rescan {
                return;
            }
            self.reset();
        }
        if self.error.is_some() {
            // The root was lost: nothing below it can be read until it is back.
            self.operations += 1;
            match self.stat_dir(&self.root) {
                Ok(_) => self.error = None,
                Err(e) => {
                    self.error = Some(format!("{}: {e}", self.root.display()));
                    return;
                }
            }
        }
        if self.dirs.is_empty() {
            self.reset();
            self.dirs.insert(self.root.clone(), DirState::default());
            self.entries = 1;
            self.changed.push_back(self.root.clone());
        }
        let mut budget = self.limits.ops_per_pass;
        if self.walked {
            if self.rescan_queue.is_empty() && self.last_rescan.elapsed() >= self.limits.rescan {
                self.rescan_queue.extend(self.dirs.keys().cloned());
                self.last_rescan = Instant::now();
            }
            let quota = (budget / 4).max(1);
            budget -= self.check_dirs(quota);
            budget = budget.saturating_sub(self.check_hot());
        }
        while budget > 0 && self.over_limit_since.is_none() && self.error.is_none() {
            if !self.list_step(&mut budget) {
                break;
            }
        }
        let idle = self.listing.is_none() && self.changed.is_empty();
        if !self.walked && idle && self.over_limit_since.is_none() && !self.dirs.is_empty() {
            self.walked = true;
            self.last_rescan = Instant::now();
        }
    }

    /// The path the tree is read at.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Moves the tree to another path of the same directory: a container
    /// node's `/proc/PID/root/...` after the node restarted. What is known
    /// is kept; following changes as usual catches up with what the node
    /// did meanwhile. A listing in progress starts over at the new path.
    pub fn rebase(&mut self, root: &Path) {
        let root: PathBuf = root.components().collect();
        if root == self.root {
            return;
        }
        let old = std::mem::replace(&mut self.root, root);
        let new = self.root.clone();
        let moved = |p: &Path| match p.strip_prefix(&old) {
            Ok(rest) if rest.as_os_str().is_empty() => new.clone(),
            Ok(rest) => new.join(rest),
            // every path of the tree is under its root
            Err(_) => p.to_path_buf(),
        };
        self.dirs = std::mem::take(&mut self.dirs).into_iter().map(|(d, state)| (moved(&d), state)).collect();
        self.changed = self.changed.iter().map(|d| moved(d)).collect();
        self.rescan_queue = self.rescan_queue.iter().map(|d| moved(d)).collect();
        self.hot = std::mem::take(&mut self.hot).into_iter().map(|(m, p)| (m, moved(&p))).collect();
        self.hot_mtime = std::mem::take(&mut self.hot_mtime).into_iter().map(|(p, m)| (moved(&p), m)).collect();
        if let Some(listing) = self.listing.take() {
            let dir = moved(&listing.dir);
            if !self.changed.contains(&dir) {
                self.changed.push_front(dir);
            }
        }
    }

    fn reset(&mut self) {
        let (root, limits, operations) = (self.root.clone(), self.limits, self.operations);
        let error = self.error.take();
        *self = DirTracker::new(&root, limits);
        self.operations = operations;
        self.error = error;
    }

    fn spend(&mut self, budget: &mut u64) {
        self.operations += 1;
        *budget = budget.saturating_sub(1);
    }

    /// Stats up to `quota` known directories (round robin) and queues the
    /// ones that changed. Returns the operations spent.
    fn check_dirs(&mut self, quota: u64) -> u64 {
        let mut keys: Vec<&PathBuf> = self.dirs.keys().collect();
        keys.sort_unstable();
        let n = keys.len().min(quota as usize);
        let mut changed = Vec::new();
        for i in 0..n {
            let dir = keys[(self.dir_cursor + i) % keys.len()];
            let now = self.stat_dir(dir).ok().map(|m| stamp(&m));
            if now.is_none() || now != self.dirs[dir].stamp {
                changed.push(dir.clone());
            }
        }
        self.dir_cursor = (self.dir_cursor + n) % keys.len().max(1);
        self.operations += n as u64;
        for dir in changed {
            if !self.changed.contains(&dir) {
                self.changed.push_front(dir);
            }
        }
        n as u64
    }

    /// Re-stats every hot file (at most `hot_capacity` of them).
    fn check_hot(&mut self) -> u64 {
        let paths: Vec<PathBuf> = self.hot.iter().map(|(_, p)| p.clone()).collect();
        for path in &paths {
            let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { continue };
            if !self.dirs.get(dir).is_some_and(|d| d.files.contains_key(name)) {
                self.drop_hot(path);
                continue;
            }
            let (dir, name) = (dir.to_path_buf(), name.to_os_string());
            match fs::symlink_metadata(path) {
                Ok(m) if !m.is_dir() => self.set_file(&dir, name, FileState::from_meta(&m)),
                // The whole tree is out of reach (the node's root went with
                // it): its files are not gone, keep them hot.
                Err(_) if self.stat_dir(&self.root).is_err() => break,
                // Gone or replaced by a directory: the parent's listing sorts it out.
                _ => {
                    self.drop_hot(path);
                    if !self.changed.contains(&dir) {
                        self.changed.push_front(dir);
                    }
                }
            }
        }
        self.operations += paths.len() as u64;
        paths.len() as u64
    }

    fn hot_capacity(&self) -> usize {
        (self.limits.ops_per_pass / 4).max(1) as usize
    }

    /// Keeps `path` hot while it was modified recently, the most recently
    /// modified first when there are more than `hot_capacity`.
    fn note_hot(&mut self, path: PathBuf, mtime: (i64, i64)) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        self.drop_hot(&path);
        if now - mtime.0 >= HOT_WINDOW_SECS {
            return;
        }
        if self.hot.len() >= self.hot_capacity() {
            match self.hot.first() {
                Some((stalest, _)) if *stalest < mtime => {
                    let (_, p) = self.hot.pop_first().expect("not empty");
                    self.hot_mtime.remove(&p);
                }
                _ => return,
            }
        }
        self.hot.insert((mtime, path.clone()));
        self.hot_mtime.insert(path, mtime);
    }

    fn drop_hot(&mut self, path: &Path) {
        if let Some(m) = self.hot_mtime.remove(path) {
            self.hot.remove(&(m, path.to_path_buf()));
        }
    }

    fn stat_dir(&self, dir: &Path) -> io::Result<fs::Metadata> {
        // The root may be a symlink to the real data dir (as `du -sb dir/`
        // follows it); below it, nothing is followed.
        if dir == self.root {
            fs::metadata(dir)
        } else {
            fs::symlink_metadata(dir)
        }
    }

    /// Advances the listing in progress (starting the next queued one when
    /// none is). Returns false when there is nothing left to do.
    fn list_step(&mut self, budget: &mut u64) -> bool {
        let mut listing = match self.listing.take() {
            Some(l) => l,
            None => {
                let (dir, force) = match self.changed.pop_front() {
                    Some(d) => (d, false),
                    None => match self.rescan_queue.pop_front() {
                        Some(d) => (d, true),
                        None => return false,
                    },
                };
                match self.open_listing(dir, force, budget) {
                    Some(l) => l,
                    None => return true,
                }
            }
        };
        loop {
            if *budget == 0 {
                self.listing = Some(listing);
                return true;
            }
            match listing.entries.next() {
                None => {
                    self.finish_listing(listing);
                    return true;
                }
                Some(Err(e)) => {
                    // Keep what is known rather than dropping unseen names
                    // on a partial read, and forget the stamp so the next
                    // pass lists the directory again for the names not read.
                    tracing::debug!("reading {}: {e}", listing.dir.display());
                    if let Some(state) = self.dirs.get_mut(&listing.dir) {
                        state.stamp = None;
                    }
                    return true;
                }
                Some(Ok(entry)) => {
                    listing.read += 1;
                    if listing.read % ENTRIES_PER_OP == 0 {
                        self.spend(budget);
                    }
                    let name = entry.file_name();
                    listing.seen.insert(name.clone());
                    let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
                    self.visit(&listing.dir, name, entry.ino(), is_dir, listing.force, budget);
                    if self.over_limit_since.is_some() {
                        return false;
                    }
                }
            }
        }
    }

    fn open_listing(&mut self, dir: PathBuf, force: bool, budget: &mut u64) -> Option<Listing> {
        if !self.dirs.contains_key(&dir) {
            // removed with its parent since it was queued
            return None;
        }
        self.spend(budget);
        let meta = match self.stat_dir(&dir) {
            Ok(m) if m.is_dir() => m,
            Ok(_) => {
                self.lost_dir(&dir, "not a directory".into());
                return None;
            }
            Err(e) => {
                self.lost_dir(&dir, e.to_string());
                return None;
            }
        };
        if dir == self.root {
            self.error = None;
        }
        // The stamp is taken before reading, so a change made while the
        // directory is being read shows up as a new stamp next pass.
        let state = self.dirs.get_mut(&dir).expect("checked above");
        self.total += meta.len() as i128 - state.own_size as i128;
        state.own_size = meta.len();
        state.stamp = Some(stamp(&meta));
        self.spend(budget);
        match fs::read_dir(&dir) {
            Ok(entries) => Some(Listing { dir, force, entries, seen: HashSet::new(), read: 0 }),
            Err(e) => {
                self.lost_dir(&dir, e.to_string());
                None
            }
        }
    }

    fn visit(&mut self, dir: &Path, name: OsString, ino: u64, is_dir: bool, force: bool, budget: &mut u64) {
        let path = dir.join(&name);
        let state = self.dirs.get(dir).expect("listed dirs are tracked");
        if is_dir {
            if state.files.contains_key(&name) {
                self.remove_file(dir, &name);
            }
            if !self.dirs[dir].subdirs.contains(&name) {
                if !self.add_entry() {
                    return;
                }
                self.dirs.get_mut(dir).expect("tracked").subdirs.insert(name);
                self.dirs.insert(path.clone(), DirState::default());
                self.changed.push_back(path);
            }
            return;
        }
        if state.subdirs.contains(&name) {
            self.remove_subtree(&path);
        }
        let known = self.dirs[dir].files.get(&name).map(|f| f.ino);
        if !force && known == Some(ino) {
            return;
        }
        self.spend(budget);
        match fs::symlink_metadata(&path) {
            Ok(m) if !m.is_dir() => {
                if known.is_none() && !self.add_entry() {
                    return;
                }
                self.set_file(dir, name, FileState::from_meta(&m));
            }
            // vanished (or became a directory) between readdir and stat
            _ => {
                if known.is_some() {
                    self.remove_file(dir, &name);
                }
            }
        }
    }

    fn finish_listing(&mut self, listing: Listing) {
        let Some(state) = self.dirs.get(&listing.dir) else { return };
        let gone_files: Vec<OsString> = state.files.keys().filter(|n| !listing.seen.contains(*n)).cloned().collect();
        let gone_dirs: Vec<OsString> = state.subdirs.iter().filter(|n| !listing.seen.contains(*n)).cloned().collect();
        for name in gone_files {
            self.remove_file(&listing.dir, &name);
        }
        for name in gone_dirs {
            self.remove_subtree(&listing.dir.join(name));
        }
    }

    /// Counts one more remembered entry; false (and the tree dropped) at the bound.
    fn add_entry(&mut self) -> bool {
        if self.entries >= self.limits.max_entries {
            tracing::debug!(
                "{}: more than {} entries; size tracking paused",
                self.root.display(),
                self.limits.max_entries
            );
            self.reset();
            self.over_limit_since = Some(Instant::now());
            // what was reached, for the entries gauge; nothing is held
            self.entries = self.limits.max_entries;
            return false;
        }
        self.entries += 1;
        true
    }

    fn lost_dir(&mut self, dir: &Path, reason: String) {
        let root_lost = match dir == self.root {
            true => Some(reason),
            false => self.stat_dir(&self.root).err().map(|e| e.to_string()),
        };
        let Some(reason) = root_lost else {
            self.remove_subtree(dir);
            return;
        };
        self.error = Some(format!("{}: {reason}", self.root.display()));
        if self.walked {
            // Keep the tree: the directory may come back at this path, or
            // at another after its container restarted (rebase), and then
            // only what changed is read again.
            if !self.changed.iter().any(|d| d == dir) {
                self.changed.push_front(dir.to_path_buf());
            }
        } else {
            self.reset();
        }
    }

    fn set_file(&mut self, dir: &Path, name: OsString, new: FileState) {
        let state = self.dirs.get_mut(dir).expect("tracked");
        let old = state.files.insert(name.clone(), new);
        if let Some(old) = old {
            self.unaccount(old);
        }
        self.account(new);
        self.note_hot(dir.join(name), new.mtime);
    }

    fn remove_file(&mut self, dir: &Path, name: &OsString) {
        if let Some(old) = self.dirs.get_mut(dir).and_then(|d| d.files.remove(name)) {
            self.unaccount(old);
            self.entries = self.entries.saturating_sub(1);
            self.drop_hot(&dir.join(name));
        }
    }

    fn remove_subtree(&mut self, dir: &Path) {
        let doomed: Vec<PathBuf> = self.dirs.keys().filter(|k| k.starts_with(dir)).cloned().collect();
        for d in doomed {
            if let Some(state) = self.dirs.remove(&d) {
                self.total -= state.own_size as i128;
                self.entries = self.entries.saturating_sub(1 + state.files.len() as u64);
                for (name, f) in state.files {
                    self.unaccount(f);
                    self.drop_hot(&d.join(name));
                }
            }
        }
        if let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) {
            if let Some(p) = self.dirs.get_mut(parent) {
                p.subdirs.remove(name);
            }
        }
    }

    fn account(&mut self, f: FileState) {
        if f.nlink > 1 {
            let e = self.links.entry((f.dev, f.ino)).or_insert((0, 0));
            // the latest size seen under any of its names is the inode's
            self.total += f.size as i128 - if e.1 > 0 { e.0 as i128 } else { 0 };
            e.0 = f.size;
            e.1 += 1;
        } else {
            self.total += f.size as i128;
        }
    }

    fn unaccount(&mut self, f: FileState) {
        if f.nlink > 1 {
            if let Some(e) = self.links.get_mut(&(f.dev, f.ino)) {
                e.1 -= 1;
                if e.1 == 0 {
                    self.total -= e.0 as i128;
                    self.links.remove(&(f.dev, f.ino));
                }
            }
        } else {
            self.total -= f.size as i128;
        }
    }
}

fn stamp(m: &fs::Metadata) -> DirStamp {
    DirStamp { ino: m.ino(), mtime_sec: m.mtime(), mtime_nsec: m.mtime_nsec() }
}

/// What a data dir's tree and figures are kept under: its target, and the
/// data dir as the node names it. Neither changes when a node in a
/// container restarts; the path the agent reads it at does. Two containers
/// may name the same path for different directories, hence the target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WatchKey {
    pub target: String,
    pub dir: PathBuf,
}

/// A data dir to watch, and whose eyes to check its writability with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchRequest {
    pub key: WatchKey,
    /// Where the agent reads it now; None while it cannot (a node in a
    /// container that is not running): its tree is kept, not read, and it
    /// has no report.
    pub dir: Option<PathBuf>,
    /// The node's filesystem uid and gid.
    pub owner: Option<(u32, u32)>,
}

#[derive(Debug, Clone, Default)]
pub struct DirReport {
    pub size_bytes: Option<u64>,
    pub entries: u64,
    pub operations: u64,
    pub over_limit: bool,
    pub error: Option<String>,
    pub writable: Option<bool>,
    /// Why the write test failed.
    pub writable_error: Option<String>,
}

/// Runs the trackers on their own thread, so a slow or hung filesystem
/// delays the data dir figures and nothing else.
pub struct DatadirWatcher {
    requests: SyncSender<Vec<WatchRequest>>,
    reports: Arc<Mutex<HashMap<WatchKey, DirReport>>>,
    skipped: u64,
    /// The thread ended (it panicked): its last reports are withdrawn.
    stopped: bool,
}

impl DatadirWatcher {
    /// `writable_check`: how often the write test runs; None: never.
    pub fn start(limits: WalkLimits, writable_check: Option<Duration>) -> io::Result<DatadirWatcher> {
        // One request in flight: while a pass is still running, the next
        // interval's request is dropped (and counted) rather than queued.
        let (requests, rx) = mpsc::sync_channel(1);
        let reports = Arc::new(Mutex::new(HashMap::new()));
        let shared = reports.clone();
        std::thread::Builder::new()
            .name("nodescope-datadir".into())
            .spawn(move || watch(rx, shared, limits, writable_check))?;
        Ok(DatadirWatcher { requests, reports, skipped: 0, stopped: false })
    }

    /// Asks for one pass over these data dirs. Never blocks.
    pub fn request(&mut self, dirs: Vec<WatchRequest>) {
        match self.requests.try_send(dirs) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.skipped += 1,
            // Frozen figures would pass for current ones: unknown instead.
            Err(TrySendError::Disconnected(_)) if !self.stopped => {
                tracing::error!("data dir size and write test off: their thread stopped");
                self.stopped = true;
                self.reports.lock().unwrap_or_else(|e| e.into_inner()).clear();
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Passes not run because the previous one had not finished.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    pub fn report(&self, key: &WatchKey) -> Option<DirReport> {
        self.reports.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned()
    }
}

struct Watched {
    tracker: DirTracker,
    writable: Option<(Instant, Result<(), String>)>,
}

fn watch(
    rx: Receiver<Vec<WatchRequest>>,
    reports: Arc<Mutex<HashMap<WatchKey, DirReport>>>,
    limits: WalkLimits,
    writable_check: Option<Duration>,
) {
    let mut watched: HashMap<WatchKey, Watched> = HashMap::new();
    while let Ok(requests) = rx.recv() {
        watched.retain(|key, _| requests.iter().any(|r| r.key == *key));
        let mut out = HashMap::new();
        for WatchRequest { key, dir, owner } in requests {
            let Some(dir) = dir else { continue };
            let w = watched
                .entry(key.clone())
                .or_insert_with(|| Watched { tracker: DirTracker::new(&dir, limits), writable: None });
            w.tracker.rebase(&dir);
            w.tracker.pass();
            let due = |every: Duration| w.writable.as_ref().is_none_or(|(at, _)| at.elapsed() >= every);
            if writable_check.is_some_and(due) {
                w.writable = Some((Instant::now(), write_test(w.tracker.root(), owner)));
            }
            let t = &w.tracker;
            let writable = w.writable.as_ref().map(|(_, r)| r.clone());
            out.insert(
                key,
                DirReport {
                    size_bytes: t.size_bytes(),
                    entries: t.entries(),
                    operations: t.operations(),
                    over_limit: t.over_limit(),
                    error: t.error().map(str::to_owned),
                    writable: writable.as_ref().map(|r| r.is_ok()),
                    writable_error: writable.and_then(|r| r.err()),
                },
            );
        }
        *reports.lock().unwrap_or_else(|e| e.into_inner()) = out;
    }
}

/// Creates, writes one byte to and removes a file in `dir`, as the node's
/// filesystem user when known: root passes permission checks and may use
/// the blocks ext4 reserves, so as root the answer could be yes while the
/// node gets EACCES or ENOSPC. Supplementary groups are not taken on, so a
/// dir writable to the node only through one of them reads as not writable.
fn write_test(dir: &Path, owner: Option<(u32, u32)>) -> Result<(), String> {
    let _as_node = owner.and_then(|(uid, gid)| FsIdentity::assume(uid, gid));
    let path = dir.join(format!(".nodescope-write-test-{}", std::process::id()));
    let attempt = || -> io::Result<()> {
        use std::io::Write;
        let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).open(&path)?;
        let written = f.write_all(b"n");
        fs::remove_file(&path)?;
        written
    };
    attempt().map_err(|e| e.to_string())
}

/// This thread's filesystem uid/gid switched to another user's until
/// dropped. setfsuid/setfsgid act on the calling thread only.
struct FsIdentity;

impl FsIdentity {
    fn assume(uid: u32, gid: u32) -> Option<FsIdentity> {
        // SAFETY: setfsuid/setfsgid have no memory effects; u32::MAX is an
        // invalid id that only queries the current value.
        unsafe {
            let current = libc::setfsuid(u32::MAX) as u32;
            if current != 0 || uid == 0 {
                return None;
            }
            libc::setfsgid(gid);
            libc::setfsuid(uid);
            if libc::setfsuid(u32::MAX) as u32 != uid {
                libc::setfsgid(0);
                return None;
            }
        }
        Some(FsIdentity)
    }
}

impl Drop for FsIdentity {
    fn drop(&mut self) {
        // SAFETY: as above; the effective ids are still 0, so going back is allowed.
        unsafe {
            libc::setfsuid(0);
            libc::setfsgid(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::Command;

    struct Tmp(PathBuf);
    impl Tmp {
        fn new(tag: &str) -> Tmp {
            let p = std::env::temp_dir().join(format!("nodescope-datadir-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Tmp(p)
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// The independent figure: coreutils' du.
    fn du_sb(dir: &Path) -> u64 {
        let out = Command::new("du").arg("-sb").arg(dir).output().expect("du (coreutils) is installed");
        assert!(out.status.success(), "du: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().parse().unwrap()
    }

    fn write(path: &Path, bytes: usize) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, vec![7u8; bytes]).unwrap();
    }

    fn limits(ops: u64) -> WalkLimits {
        WalkLimits { ops_per_pass: ops, max_entries: 100_000, rescan: Duration::from_secs(3600) }
    }

    fn settle(t: &mut DirTracker, passes: usize) {
        for _ in 0..passes {
            t.pass();
        }
    }

    #[test]
    fn first_walk_is_bounded_and_resumable() {
        let tmp = Tmp::new("walk");
        for d in 0..10 {
            for f in 0..30 {
                write(&tmp.0.join(format!("d{d}/sub/f{f}")), d * 100 + f * 7 + 1);
            }
        }
        let mut t = DirTracker::new(&tmp.0, limits(20));
        let mut passes = 0;
        while t.size_bytes().is_none() {
            let before = t.operations();
            t.pass();
            // one listing step may finish a stat begun at the budget's edge
            assert!(t.operations() - before <= 21, "pass spent {} operations", t.operations() - before);
            passes += 1;
            assert!(passes < 1000, "walk never completed");
        }
        // 300 files and 21 directories at 20 operations per pass
        assert!(passes >= 15, "walk finished in {passes} passes: not bounded");
        assert_eq!(t.size_bytes(), Some(du_sb(&tmp.0)));
        assert_eq!(t.entries(), 300 + 21);
    }

    #[test]
    fn follows_changes_like_du() {
        let tmp = Tmp::new("follow");
        write(&tmp.0.join("blocks/blk00000.dat"), 100_000);
        write(&tmp.0.join("chainstate/000001.ldb"), 5_000);
        write(&tmp.0.join("debug.log"), 10);
        let mut t = DirTracker::new(&tmp.0, limits(1000));
        settle(&mut t, 2);
        assert_eq!(t.size_bytes(), Some(du_sb(&tmp.0)));

        // appended in place: the directory does not change, the file is hot
        let mut f = fs::OpenOptions::new().append(true).open(tmp.0.join("blocks/blk00000.dat")).unwrap();
        f.write_all(&[1u8; 12_345]).unwrap();
        drop(f);
        settle(&mut t, 1);
        assert_eq!(t.size_bytes(), Some(du_sb(&tmp.0)), "append");

        // a new file, a replaced file (same name, new inode), a removed tree
        write(&tmp.0.join("chainstate/000002.ldb"), 9_999);
        write(&tmp.0.join("chainstate/tmp"), 777);
        fs::rename(tmp.0.join("chainstate/tmp"), tmp.0.join("chainstate/000001.ldb")).unwrap();
        write(&tmp.0.join("indexes/txindex/a"), 4096);
        settle(&mut t, 3);
        assert_eq!(t.size_bytes(), Some(du_sb(&tmp.0)), "add/replace");
        fs::remove_dir_all(tmp.0.join("indexes")).unwrap();
        settle(&mut t, 2);
        assert_eq!(t.size_bytes(), Some(du_sb(&tmp.0)), "remove tree");

        // hard links counted once, symlinks by their own size
        fs::hard_link(tmp.0.join("blocks/blk00000.dat"), tmp.0.join("blocks/link.dat")).unwrap();
        std::os::unix::fs::symlink("/a/rather/long/target/path", tmp.0.join("sym")).unwrap();
        settle(&mut t, 2);
        assert_eq!(t.size_bytes(), Some(du_sb(&tmp.0)), "links");
        // a file turned into a directory
        fs::remove_file(tmp.0.join("debug.log")).unwrap();
        write(&tmp.0.join("debug.log/inner"), 33);
        settle(&mut t, 3);
        assert_eq!(t.size_bytes(), Some(du_sb(&tmp.0)), "file to dir");
    }

    #[test]
    fn the_newest_files_stay_hot_when_there_are_too_many() {
        let tmp = Tmp::new("hot");
        // 20 freshly written files: all "recent", five times the hot capacity
        for f in 0..20 {
            write(&tmp.0.join(format!("chainstate/{f:06}.ldb")), 100);
        }
        let mut t = DirTracker::new(&tmp.0, limits(16));
        settle(&mut t, 5);
        assert_eq!(t.size_bytes(), Some(du_sb(&tmp.0)));
        std::thread::sleep(Duration::from_millis(20));
        let blk = tmp.0.join("blocks/blk00001.dat");
        write(&blk, 10);
        settle(&mut t, 3);
        // appends change neither directory: only the hot list can see them
        for i in 0..5 {
            let mut f = fs::OpenOptions::new().append(true).open(&blk).unwrap();
            f.write_all(&vec![3u8; 1000 * (i + 1)]).unwrap();
            drop(f);
            t.pass();
            assert_eq!(t.size_bytes(), Some(du_sb(&tmp.0)), "append {i}");
        }
    }

    #[test]
    fn rescan_corrects_cold_in_place_rewrites() {
        let tmp = Tmp::new("rescan");
        let cold = tmp.0.join("old.dat");
        write(&cold, 1000);
        let old = SystemTime::now() - Duration::from_secs(86400);
        fs::File::options().write(true).open(&cold).unwrap().set_modified(old).unwrap();
        let mut t = DirTracker::new(&tmp.0, WalkLimits { rescan: Duration::from_millis(300), ..limits(1000) });
        settle(&mut t, 1);
        assert_eq!(t.size_bytes(), Some(1000 + fs::metadata(&tmp.0).unwrap().len()));

        // grow it in place and put its mtime back: neither the directory nor
        // the hot list can see this one
        let f = fs::OpenOptions::new().append(true).open(&cold).unwrap();
        f.set_len(5000).unwrap();
        f.set_modified(old).unwrap();
        drop(f);
        settle(&mut t, 1);
        assert_ne!(t.size_bytes(), Some(du_sb(&tmp.0)), "seen without a rescan: the test does not test the rescan");
        std::thread::sleep(Duration::from_millis(350));
        settle(&mut t, 2);
        assert_eq!(t.size_bytes(), Some(du_sb(&tmp.0)));
    }

    #[test]
    fn entry_bound_makes_size_unknown() {
        let tmp = Tmp::new("bound");
        for f in 0..50 {
            write(&tmp.0.join(format!("f{f}")), 10);
        }
        let mut t = DirTracker::new(&tmp.0, WalkLimits { max_entries: 20, ..limits(1000) });
        settle(&mut t, 3);
        assert!(t.over_limit());
        assert_eq!(t.size_bytes(), None);
        assert_eq!(t.entries(), 20);
        assert!(t.dirs.is_empty(), "the tree is dropped at the bound");
    }

    #[test]
    fn missing_root_then_created() {
        let tmp = Tmp::new("missing");
        let root = tmp.0.join("not-yet");
        let mut t = DirTracker::new(&root, limits(100));
        settle(&mut t, 2);
        assert_eq!(t.size_bytes(), None);
        assert!(t.error().unwrap().contains("not-yet"));
        write(&root.join("x"), 5);
        settle(&mut t, 2);
        assert_eq!(t.size_bytes(), Some(du_sb(&root)));
    }

    /// Two paths of one directory, as /proc/OLD/root/... and
    /// /proc/NEW/root/... are for a container's data dir across a restart.
    fn two_paths(tmp: &Tmp) -> (PathBuf, PathBuf, PathBuf) {
        let real = tmp.0.join("real");
        fs::create_dir_all(&real).unwrap();
        let (old, new) = (tmp.0.join("proc-old"), tmp.0.join("proc-new"));
        std::os::unix::fs::symlink(&real, &old).unwrap();
        std::os::unix::fs::symlink(&real, &new).unwrap();
        (real, old, new)
    }

    #[test]
    fn rebase_keeps_the_tree_and_follows_changes_at_the_new_path() {
        let tmp = Tmp::new("rebase");
        let (real, old, new) = two_paths(&tmp);
        for f in 0..40 {
            write(&real.join(format!("blocks/blk{f:05}.dat")), 1000 + f);
        }
        write(&real.join("debug.log"), 10);
        let mut t = DirTracker::new(&old, limits(1000));
        settle(&mut t, 2);
        assert_eq!(t.size_bytes(), Some(du_sb(&real)));
        let entries = t.entries();
        let before = t.operations();
        t.pass();
        let steady = t.operations() - before;

        // the node restarted: its old path is gone, its data is not
        fs::remove_file(&old).unwrap();
        t.rebase(&new);
        assert_eq!(t.root(), new.as_path());
        assert_eq!(t.size_bytes(), Some(du_sb(&real)), "totals kept across the move");
        let before = t.operations();
        t.pass();
        let spent = t.operations() - before;
        assert!(spent <= steady, "{spent} operations after the move, {steady} before: walked again");
        assert_eq!(t.entries(), entries);
        assert!(t.dirs.keys().all(|d| d.starts_with(&new)) && t.hot.iter().all(|(_, p)| p.starts_with(&new)));

        // what the restarted node writes is followed at the new path
        let mut f = fs::OpenOptions::new().append(true).open(real.join("debug.log")).unwrap();
        f.write_all(&[1u8; 500]).unwrap();
        drop(f);
        write(&real.join("chainstate/000001.ldb"), 4321);
        settle(&mut t, 2);
        assert_eq!(t.size_bytes(), Some(du_sb(&real)));
    }

    #[test]
    fn a_lost_root_keeps_the_tree_until_it_is_back() {
        let tmp = Tmp::new("lost");
        let (real, old, _) = two_paths(&tmp);
        write(&real.join("blocks/blk00000.dat"), 5000);
        write(&real.join("chainstate/a.ldb"), 300);
        let mut t = DirTracker::new(&old, limits(1000));
        settle(&mut t, 2);
        let (size, entries) = (t.size_bytes(), t.entries());
        assert_eq!(size, Some(du_sb(&real)));

        fs::remove_file(&old).unwrap();
        settle(&mut t, 2);
        assert_eq!(t.size_bytes(), None, "unknown while out of reach");
        assert!(t.error().unwrap().contains("proc-old"), "{:?}", t.error());
        assert_eq!(t.entries(), entries, "the tree is kept");
        assert!(!t.hot.is_empty(), "hot files are kept");

        std::os::unix::fs::symlink(&real, &old).unwrap();
        t.pass();
        assert_eq!(t.error(), None);
        assert_eq!(t.size_bytes(), size);
    }

    #[test]
    fn watcher_keeps_trees_by_target_and_node_path() {
        let tmp = Tmp::new("watcher");
        let (real, old, new) = two_paths(&tmp);
        for f in 0..50 {
            write(&real.join(format!("f{f}")), 100);
        }
        // A rendezvous channel: a send returns once the thread is done with
        // the previous request. A fresh walk at 16 operations per pass takes
        // four passes or more.
        let (tx, rx) = mpsc::sync_channel(0);
        let reports = Arc::new(Mutex::new(HashMap::new()));
        let shared = reports.clone();
        let thread = std::thread::spawn(move || watch(rx, shared, limits(16), Some(Duration::from_secs(3600))));
        let key = WatchKey { target: "ltc".into(), dir: PathBuf::from("/data/regtest") };
        let other = WatchKey { target: "ltc2".into(), dir: key.dir.clone() };
        let request =
            |dir: Option<&Path>| vec![WatchRequest { key: key.clone(), dir: dir.map(Path::to_path_buf), owner: None }];
        // the second send waits for the first's pass to end
        let passes = |n: usize, dir: Option<&Path>| {
            for _ in 0..=n {
                tx.send(request(dir)).unwrap();
            }
        };
        let report = |key: &WatchKey| reports.lock().unwrap().get(key).cloned();

        passes(20, Some(&old));
        assert_eq!(report(&key).unwrap().size_bytes, Some(du_sb(&real)));
        assert!(report(&other).is_none(), "another target's tree is its own");

        // the node is down: no report, the tree waits
        passes(1, None);
        assert!(report(&key).is_none());
        // back under another pid: its size after a single pass
        fs::remove_file(&old).unwrap();
        passes(1, Some(&new));
        let r = report(&key).unwrap();
        assert_eq!(r.size_bytes, Some(du_sb(&real)));
        assert_eq!(r.writable, Some(true));
        drop(tx);
        thread.join().unwrap();
    }

    #[test]
    fn write_test_off_writes_nothing() {
        use std::os::unix::fs::MetadataExt;
        let tmp = Tmp::new("no-write-test");
        write(&tmp.0.join("f"), 100);
        let mtime = |p: &Path| fs::metadata(p).map(|m| (m.mtime(), m.mtime_nsec())).unwrap();
        let before = mtime(&tmp.0);
        let (tx, rx) = mpsc::sync_channel(0);
        let reports = Arc::new(Mutex::new(HashMap::new()));
        let shared = reports.clone();
        let thread = std::thread::spawn(move || watch(rx, shared, limits(16), None));
        let key = WatchKey { target: "ltc".into(), dir: tmp.0.clone() };
        for _ in 0..3 {
            tx.send(vec![WatchRequest { key: key.clone(), dir: Some(tmp.0.clone()), owner: None }]).unwrap();
        }
        drop(tx);
        thread.join().unwrap();
        let r = reports.lock().unwrap().get(&key).cloned().unwrap();
        assert_eq!((r.writable, r.writable_error), (None, None));
        assert_eq!(r.size_bytes, Some(du_sb(&tmp.0)));
        // no file was made and removed in it
        assert_eq!(mtime(&tmp.0), before);
    }

    #[test]
    fn write_test_as_root_and_missing_dir() {
        let tmp = Tmp::new("writable");
        assert_eq!(write_test(&tmp.0, None), Ok(()));
        assert!(fs::read_dir(&tmp.0).unwrap().next().is_none(), "write test left a file behind");
        assert!(write_test(&tmp.0.join("absent"), None).is_err());
    }
}

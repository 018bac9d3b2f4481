//! The agent's totals across its restarts: one JSON file in
//! `agent.state_dir`, written after every collection (to a temporary file,
//! synced, then renamed over the old one, so a crash leaves the old or the
//! new file, never half of one). With the kernel side pinned (bpf::pins),
//! a restarted agent resumes every counter where the last one left it.
//! docs/architecture.md, "Across restarts", says what is kept.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::bpf::abi;

const FILE: &str = "state.json";
/// Past this a state file is not read (it holds at most a few thousand
/// peers per target; a bigger one is not ours).
const MAX_BYTES: u64 = 64 << 20;

/// A restored histogram is handed to its instrument one observation at a
/// time (OpenTelemetry's histograms take no count), so its replay is
/// bounded: past this many observations (about 0.2 s of the first
/// collection) a target's histogram restarts from zero instead, which
/// Prometheus sees as a reset of that histogram only. Counted in
/// `nodescope_state_histograms_restarted_total`.
pub const MAX_HISTOGRAM_REPLAY: u64 = 1_000_000;

static HISTOGRAMS_RESTARTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether a restored histogram of `observations` is replayed; if not, the
/// caller starts it from zero, and this counts and logs it.
pub fn replay_histogram(signal: &str, target: &str, observations: u64) -> bool {
    if observations <= MAX_HISTOGRAM_REPLAY {
        return true;
    }
    HISTOGRAMS_RESTARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::warn!(
        "{signal}: the saved histograms of target {target} hold {observations} observations, more than the \
         {MAX_HISTOGRAM_REPLAY} replayed at start: they restart from zero (the counters go on)"
    );
    false
}

/// Restored histograms started from zero (replay_histogram).
pub fn histograms_restarted() -> u64 {
    HISTOGRAMS_RESTARTED.load(std::sync::atomic::Ordering::Relaxed)
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("agent.state_dir {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("agent.state_dir {0}: another nodescope holds it (one agent per state directory)")]
    Locked(PathBuf),
}

/// What one agent leaves for the next.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Saved {
    /// NS_LAYOUT_VERSION of the agent that wrote it: the kernel records the
    /// totals below continue from are read with that layout.
    pub layout: u32,
    pub saved_unix: u64,
    /// Target name -> the index the kernel's records carry.
    pub slots: BTreeMap<String, u32>,
    /// Each signal's own part, by signal name.
    pub signals: BTreeMap<String, serde_json::Value>,
}

/// The state directory, held (flock) while the agent runs.
pub struct StateFile {
    dir: PathBuf,
    _lock: File,
}

impl StateFile {
    /// Takes the directory (made if missing) and reads what an earlier agent
    /// saved there. `fresh` discards it. A file that cannot be read, or was
    /// written for another map layout, is set aside and logged: the agent
    /// then counts from zero.
    pub fn open(dir: &Path, fresh: bool) -> Result<(StateFile, Option<Saved>), StateError> {
        let io = |source| StateError::Io { path: dir.to_path_buf(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = File::create(dir.join("lock")).map_err(io)?;
        // SAFETY: flock on a file descriptor this function owns.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(StateError::Locked(dir.to_path_buf()));
        }
        let state = StateFile { dir: dir.to_path_buf(), _lock: lock };
        let path = dir.join(FILE);
        if fresh {
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::warn!("--fresh: {} removed; every counter starts from zero", path.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StateError::Io { path, source: e }),
            }
            return Ok((state, None));
        }
        let saved = match read(&path) {
            Ok(None) => None,
            Ok(Some(saved)) if saved.layout == abi::LAYOUT_VERSION => Some(saved),
            Ok(Some(saved)) => {
                tracing::warn!(
                    "{}: written for map layout v{} (this build: v{}); counters start from zero",
                    path.display(),
                    saved.layout,
                    abi::LAYOUT_VERSION
                );
                None
            }
            Err(reason) => {
                tracing::warn!("{}: {reason}; counters start from zero", path.display());
                None
            }
        };
        Ok((state, saved))
    }

    /// Replaces the file with `saved`, atomically.
    pub fn save(&self, saved: &Saved) -> std::io::Result<()> {
        let path = self.dir.join(FILE);
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let mut file = File::create(&tmp)?;
        serde_json::to_writer(&mut file, saved).map_err(std::io::Error::other)?;
        file.flush()?;
        file.sync_data()?;
        std::fs::rename(&tmp, &path)?;
        File::open(&self.dir)?.sync_all()
    }
}

fn read(path: &Path) -> Result<Option<Saved>, String> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() || meta.len() > MAX_BYTES {
        return Err(format!("not a regular file under {MAX_BYTES} bytes"));
    }
    serde_json::from_reader(std::io::BufReader::new(file)).map(Some).map_err(|e| format!("unreadable: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nodescope-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn saved_then_read_back_and_locked_while_held() {
        let dir = temp_dir("roundtrip");
        let (state, saved) = StateFile::open(&dir, false).unwrap();
        assert!(saved.is_none());
        let mut s = Saved { layout: abi::LAYOUT_VERSION, saved_unix: 7, ..Saved::default() };
        s.slots.insert("ltc".into(), 3);
        s.signals.insert("net".into(), serde_json::json!({"x": 1}));
        state.save(&s).unwrap();
        assert!(matches!(StateFile::open(&dir, false), Err(StateError::Locked(_))));
        drop(state);
        let (_state, back) = StateFile::open(&dir, false).unwrap();
        let back = back.unwrap();
        assert_eq!(back.slots["ltc"], 3);
        assert_eq!(back.signals["net"]["x"], 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn other_layout_garbage_and_fresh_start_from_zero() {
        let dir = temp_dir("reset");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(FILE), r#"{"layout": 999, "saved_unix": 1, "slots": {}, "signals": {}}"#).unwrap();
        assert!(StateFile::open(&dir, false).unwrap().1.is_none());
        std::fs::write(dir.join(FILE), "{not json").unwrap();
        assert!(StateFile::open(&dir, false).unwrap().1.is_none());
        let good = format!(r#"{{"layout": {}, "saved_unix": 1, "slots": {{}}, "signals": {{}}}}"#, abi::LAYOUT_VERSION);
        std::fs::write(dir.join(FILE), &good).unwrap();
        assert!(StateFile::open(&dir, false).unwrap().1.is_some());
        assert!(StateFile::open(&dir, true).unwrap().1.is_none());
        assert!(!dir.join(FILE).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

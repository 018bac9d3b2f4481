//! Whether the disk signal's hooks see the writes to a target's data dir.
//!
//! The filesystem method hooks ext4 and xfs (and direct I/O of any iomap
//! filesystem, and dirtied folios of any): a data dir on btrfs, zfs, a
//! network filesystem or tmpfs is not covered, and that is reported (in
//! `nodescope probes`, `/health/detailed` and `nodescope_disk_covered`), never
//! silently made up for. The syscall method covers every filesystem.
//!
//! The filesystem is statfs(2)'s f_type of the data dir, asked on a thread
//! of its own with a timeout (a hung network mount must not stall the
//! collection loop). An overlay (a container without a volume) is covered
//! when its upper layer is: writes go through to the upper filesystem's own
//! hooks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::config::DiskMethod;
use crate::target::Target;

use super::probe::Hooked;

/// What the hooks see of one target's data dir.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Coverage {
    /// "ext4", "xfs", "btrfs", "overlay/ext4"...; None: not known (no data
    /// dir, or statfs failed: see `detail`).
    pub filesystem: Option<String>,
    /// None when the filesystem is not known.
    pub covered: Option<bool>,
    /// Sync calls are timed (ext4, or the syscall method); on xfs they are
    /// counted only.
    pub sync_latency: bool,
    pub detail: String,
}

/// statfs f_type values (include/uapi/linux/magic.h, and zfs's own).
const EXT4: i64 = 0xEF53;
const XFS: i64 = 0x5846_5342;
const OVERLAY: i64 = 0x794c_7630;

pub fn fs_name(magic: i64) -> String {
    match magic {
        EXT4 => "ext4".into(), // also ext2 and ext3, which the ext4 driver mounts
        XFS => "xfs".into(),
        OVERLAY => "overlay".into(),
        0x9123_683E => "btrfs".into(),
        0x2FC1_2FC1 => "zfs".into(),
        0x6969 => "nfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x6573_5546 => "fuse".into(),
        0xF2F5_2010 => "f2fs".into(),
        0xca45_1a4e => "bcachefs".into(),
        0x00c3_6400 => "ceph".into(),
        0xFF53_4D42 => "cifs".into(),
        0xFE53_4D42 => "smb2".into(),
        0x5265_4973 => "reiserfs".into(),
        0x3153_464a => "jfs".into(),
        0x7371_7368 => "squashfs".into(),
        m => format!("0x{m:x}"),
    }
}

/// statfs(2)'s f_type, on a thread that may hang in a dead mount; Err
/// after `timeout`, with the receiver to ask again later.
fn statfs_type(path: PathBuf) -> mpsc::Receiver<std::io::Result<i64>> {
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new().name("nodescope-statfs".into()).spawn(move || {
        let _ = tx.send(statfs_now(&path));
    });
    if let Err(e) = spawned {
        let (tx, rx) = mpsc::channel();
        let _ = tx.send(Err(e));
        return rx;
    }
    rx
}

fn statfs_now(path: &Path) -> std::io::Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: zeroed is a valid bit pattern for the plain C struct statfs.
    let mut raw: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is NUL-terminated, raw a valid out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut raw) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(raw.f_type as i64)
}

/// The upper directory of the overlay mount holding `node_path` (a path in
/// the node's mount namespace), from the node's mountinfo.
fn overlay_upper(mountinfo: &str, node_path: &Path) -> Option<PathBuf> {
    let mut best: Option<(usize, PathBuf)> = None;
    for mount in crate::mountinfo::parse(mountinfo) {
        if !node_path.starts_with(&mount.mount_point) {
            continue;
        }
        let depth = mount.mount_point.components().count();
        if best.as_ref().is_some_and(|(d, _)| *d > depth) {
            continue;
        }
        let upper = (mount.fs_type == "overlay")
            .then(|| mount.super_options.get("upperdir").cloned().flatten().map(PathBuf::from))
            .flatten()
            .unwrap_or_default();
        best = Some((depth, upper));
    }
    best.map(|(_, u)| u).filter(|u| !u.as_os_str().is_empty())
}

/// How often a data dir's filesystem is asked again (it may be remounted).
const RECHECK: Duration = Duration::from_secs(60);
/// How long the collection loop waits for statfs before moving on.
const STATFS_WAIT: Duration = Duration::from_millis(300);

struct Entry {
    datadir: PathBuf,
    at: Instant,
    coverage: Coverage,
    /// a statfs still running (a hung mount): asked again only once it answers
    pending: Option<mpsc::Receiver<std::io::Result<i64>>>,
}

pub struct CoverageTracker {
    method: DiskMethod,
    hooked: Hooked,
    entries: HashMap<String, Entry>,
}

impl CoverageTracker {
    pub fn new(method: DiskMethod, hooked: Hooked) -> CoverageTracker {
        CoverageTracker { method, hooked, entries: HashMap::new() }
    }

    /// The coverage of `t`'s data dir, asked again when its data dir
    /// changed or every minute.
    pub fn check(&mut self, t: &Target) -> Coverage {
        let Some(datadir) = t.host_datadir() else {
            self.entries.remove(&t.name);
            return Coverage {
                detail: "data dir not known".into(),
                sync_latency: self.method == DiskMethod::Syscalls,
                ..Coverage::default()
            };
        };
        let entry = self.entries.get_mut(&t.name);
        let fresh =
            entry.as_ref().is_some_and(|e| e.datadir == datadir && (e.at.elapsed() < RECHECK || e.pending.is_some()));
        if !fresh {
            let rx = statfs_type(datadir.clone());
            let e = Entry {
                datadir: datadir.clone(),
                at: Instant::now(),
                coverage: Coverage::default(),
                pending: Some(rx),
            };
            self.entries.insert(t.name.clone(), e);
        }
        let (method, hooked) = (self.method, self.hooked);
        let e = self.entries.get_mut(&t.name).expect("inserted above");
        if let Some(rx) = &e.pending {
            match rx.recv_timeout(STATFS_WAIT) {
                Ok(r) => {
                    let previous = e.coverage.clone();
                    e.coverage = judge(method, hooked, r, t);
                    e.pending = None;
                    e.at = Instant::now();
                    if e.coverage != previous && e.coverage.covered == Some(false) {
                        tracing::warn!(target_name = %t.name, "disk signal: {}", e.coverage.detail);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if e.coverage.filesystem.is_none() {
                        e.coverage.detail = format!("statfs of {} has not answered (a hung mount?)", datadir.display());
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => e.pending = None,
            }
        }
        e.coverage.clone()
    }
}

fn judge(method: DiskMethod, hooked: Hooked, statfs: std::io::Result<i64>, t: &Target) -> Coverage {
    let datadir = t.host_datadir().unwrap_or_default();
    let magic = match statfs {
        Ok(m) => m,
        Err(e) => {
            return Coverage {
                detail: format!("statfs {}: {e}", datadir.display()),
                sync_latency: method == DiskMethod::Syscalls,
                ..Coverage::default()
            }
        }
    };
    let mut name = fs_name(magic);
    let mut effective = magic;
    if magic == OVERLAY {
        // the upper layer: where the node's writes land
        let info =
            t.pid.and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()).unwrap_or_default();
        let upper = t.datadir.as_deref().and_then(|d| overlay_upper(&info, d));
        match upper.map(|u| statfs_now(&u)) {
            Some(Ok(m)) => {
                effective = m;
                name = format!("overlay/{}", fs_name(m));
            }
            _ => name = "overlay/unknown".into(),
        }
    }
    let (covered, sync_latency) = match method {
        DiskMethod::Syscalls => (true, true),
        DiskMethod::Filesystem => match effective {
            EXT4 => (hooked.ext4, true),
            XFS => (hooked.xfs, false),
            _ => (false, false),
        },
    };
    let detail = match (method, covered) {
        (DiskMethod::Syscalls, _) => format!("data dir on {name}: counted by the syscall tracepoints"),
        (_, true) if sync_latency => format!("data dir on {name}: writes and timed syncs counted by its filesystem hooks"),
        (_, true) => format!("data dir on {name}: writes and syncs counted by its filesystem hooks; sync latency is not measured on {name} (it has no sync exit tracepoint)"),
        (_, false) if effective == EXT4 || effective == XFS => {
            format!("data dir on {name}: this kernel refused the {name} hooks (see `nodescope probes`): its writes are not counted")
        }
        (_, false) => format!(
            "data dir on {name}: the filesystem hooks do not see its writes (only direct I/O and stores through mappings); set [disk] method = \"syscalls\" to count them, at a cost to every syscall on the host (docs/disk.md)"
        ),
    };
    Coverage { filesystem: Some(name), covered: Some(covered), sync_latency, detail }
}

/// What `nodescope probes` reports per target: whether the configured
/// method's hooks (as `hooks` says this kernel takes them) see the target's
/// data dir.
pub fn probe_datadirs(config: &crate::config::Config, hooks: &[crate::bpf::HookStatus]) -> Vec<crate::bpf::HookStatus> {
    use super::probe::{Group, FS_HOOKS};
    if !config.disk.enabled {
        return Vec::new();
    }
    let attached = |group: Group| {
        FS_HOOKS.iter().filter(|(_, _, g)| *g == group || *g == Group::All).all(|(_, hook, _)| {
            hooks.iter().any(|h| h.signal == "disk" && h.hook == format!("tp_btf/{hook}") && h.supported)
        })
    };
    let hooked = match config.disk.method {
        DiskMethod::Filesystem => Hooked { ext4: attached(Group::Ext4), xfs: attached(Group::Xfs), any: false },
        DiskMethod::Syscalls => {
            let all = hooks.iter().filter(|h| h.signal == "disk-syscalls").all(|h| h.supported);
            Hooked { ext4: all, xfs: all, any: all }
        }
    };
    let mounts = crate::cgroup::Mounts::read().unwrap_or_default();
    let mut targets = crate::target::Targets::new(config, mounts);
    let mut tracker = CoverageTracker::new(config.disk.method, hooked);
    targets
        .refresh()
        .iter()
        .map(|t| {
            let c = tracker.check(t);
            crate::bpf::HookStatus {
                signal: "disk",
                hook: format!("data dir of {}", t.name),
                program: "-",
                supported: c.covered.unwrap_or(false),
                detail: if c.filesystem.is_some() { c.detail } else { format!("filesystem not known: {}", c.detail) },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(fs_name(0xEF53), "ext4");
        assert_eq!(fs_name(0x58465342), "xfs");
        assert_eq!(fs_name(0x9123683E), "btrfs");
        assert_eq!(fs_name(0x1234), "0x1234");
    }

    #[test]
    fn overlay_upper_dir_of_the_deepest_mount() {
        let info = "\
1 0 0:30 / / rw,relatime - overlay overlay rw,lowerdir=/l1:/l2,upperdir=/var/lib/c/overlay/ab/diff,workdir=/var/lib/c/overlay/ab/work
2 1 0:5 / /proc rw - proc proc rw
3 1 8:1 /vol /data\\040dir rw - ext4 /dev/vda rw
";
        assert_eq!(
            overlay_upper(info, Path::new("/home/node/.litecoin")),
            Some(PathBuf::from("/var/lib/c/overlay/ab/diff"))
        );
        // a volume mounted over it: not an overlay
        assert_eq!(overlay_upper(info, Path::new("/data dir/x")), None);
    }

    #[test]
    fn root_is_some_filesystem() {
        assert!(statfs_now(Path::new("/")).is_ok());
        assert!(statfs_now(Path::new("/nonexistent/nodescope")).is_err());
    }
}

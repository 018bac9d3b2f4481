//! Keeping the kernel side across agent restarts and upgrades.
//!
//! With `[agent] state_dir` set, an object's maps and its programs' links
//! are pinned under `<pin_dir>/v<NS_LAYOUT_VERSION>/<object>/`: the programs
//! stay attached and keep counting while the agent is down (a crash, an
//! upgrade), and the next agent takes the maps over where the last one left
//! them. The handover (scope.bpf.h's `ns_active`): the new agent loads its
//! programs with a new generation and attaches them, writes that generation
//! to `ns_active` (from then on the old programs leave at once), then
//! removes the old links, which detaches them. docs/architecture.md, "Across
//! restarts", has what is kept and what is not.

use std::path::{Path, PathBuf};

use aya::maps::MapData;
use aya::programs::links::{FdLink, PinnedLink};
use aya::Ebpf;

use super::{abi, BpfError};

/// The map holding the active generation (scope.bpf.h).
pub const ACTIVE: &str = "ns_active";

/// `<pin_dir>/v<layout>`, made ready for this agent's layout.
#[derive(Debug, Clone)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    /// Removes what agents of another layout pinned under `pin_dir` (their
    /// maps cannot be read by this build), and with `fresh` this layout's
    /// too; each removal is logged with what it loses.
    pub fn prepare(pin_dir: &Path, fresh: bool) -> Result<Pins, BpfError> {
        ensure_bpffs()?;
        let ours = format!("v{}", abi::LAYOUT_VERSION);
        std::fs::create_dir_all(pin_dir).map_err(|e| pin_error(pin_dir, e))?;
        let entries = std::fs::read_dir(pin_dir).map_err(|e| pin_error(pin_dir, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == ours && !fresh {
                continue;
            }
            let path = entry.path();
            if name == ours {
                tracing::warn!(
                    "--fresh: removing {}: the kernel's records of open connections and the counts made while no agent ran are dropped",
                    path.display()
                );
            } else {
                tracing::warn!(
                    "removing {}: pinned by a nodescope of another map layout ({name}, this build reads {ours}); the counts it held since that agent stopped are lost, the agent's totals go on from its state file",
                    path.display()
                );
            }
            std::fs::remove_dir_all(&path).map_err(|e| pin_error(&path, e))?;
        }
        let root = pin_dir.join(ours);
        std::fs::create_dir_all(&root).map_err(|e| pin_error(&root, e))?;
        Ok(Pins { root })
    }

    pub fn object(&self, object: &str) -> Kept {
        Kept { dir: self.root.join(object.trim_end_matches(".bpf.o")) }
    }
}

/// One object's pins: `maps/<name>` and `links/<generation>/<program>`.
#[derive(Debug, Clone)]
pub struct Kept {
    dir: PathBuf,
}

impl Kept {
    pub fn map_path(&self, map: &str) -> PathBuf {
        self.dir.join("maps").join(map)
    }

    fn links_dir(&self, generation: u32) -> PathBuf {
        self.dir.join("links").join(generation.to_string())
    }

    /// The generation an earlier agent activated, when its maps are pinned.
    pub fn active_generation(&self) -> Option<u32> {
        let map = MapData::from_pin(self.map_path(ACTIVE)).ok()?;
        let array = aya::maps::Array::<MapData, u32>::try_from(aya::maps::Map::Array(map)).ok()?;
        array.get(&0, 0).ok()
    }

    /// Maps whose pinned size is not what this start asks for (a changed
    /// `[limits]`): (map, pinned, wanted).
    pub fn resized(&self, sizes: &[(&'static str, u32)]) -> Vec<(&'static str, u32, u32)> {
        sizes
            .iter()
            .filter_map(|&(map, want)| {
                let info = MapData::from_pin(self.map_path(map)).ok()?.info().ok()?;
                (info.max_entries() != want).then_some((map, info.max_entries(), want))
            })
            .collect()
    }

    /// Drops everything pinned for this object (its old links detach).
    pub fn clear(&self) -> Result<(), BpfError> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(pin_error(&self.dir, e)),
            _ => Ok(()),
        }
    }

    pub fn prepare_maps(&self) -> Result<(), BpfError> {
        let dir = self.dir.join("maps");
        std::fs::create_dir_all(&dir).map_err(|e| pin_error(&dir, e))
    }
}

/// bpffs at /sys/fs/bpf, mounted if it is not (fresh hosts often boot
/// without it).
fn ensure_bpffs() -> Result<(), BpfError> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let root = c"/sys/fs/bpf";
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: statfs with a NUL-terminated path and a buffer of its type.
    if unsafe { libc::statfs(root.as_ptr(), st.as_mut_ptr()) } == 0 {
        // SAFETY: statfs succeeded and filled it.
        if unsafe { st.assume_init() }.f_type == BPF_FS_MAGIC {
            return Ok(());
        }
    }
    // SAFETY: plain mount(2) with NUL-terminated literals.
    if unsafe { libc::mount(c"bpf".as_ptr(), root.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) } != 0 {
        return Err(BpfError::Mount(format!(
            "bpffs is not mounted at /sys/fs/bpf and mounting it failed: {}",
            std::io::Error::last_os_error()
        )));
    }
    tracing::info!("mounted bpffs at /sys/fs/bpf (to keep the kernel side across restarts)");
    Ok(())
}

fn pin_error(path: &Path, e: std::io::Error) -> BpfError {
    BpfError::Pin(format!("{}: {e}", path.display()))
}

/// A program's attachment, held by the probe while the agent runs.
pub enum HeldLink {
    /// Detached when the agent exits.
    Owned(#[allow(dead_code)] FdLink),
    /// Stays attached after the agent exits, until the next agent's handover.
    Pinned(#[allow(dead_code)] PinnedLink),
}

/// Makes the programs of `generation` the ones that count: pins their links
/// (when kept), writes the generation to `ns_active`, then removes the
/// links of earlier generations.
pub fn activate(
    ebpf: &mut Ebpf,
    generation: u32,
    kept: Option<&Kept>,
    links: Vec<(&'static str, FdLink)>,
) -> Result<Vec<HeldLink>, BpfError> {
    let mut held = Vec::new();
    match kept {
        Some(kept) => {
            let dir = kept.links_dir(generation);
            // a start of the same generation that died half-way may have left some
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).map_err(|e| pin_error(&dir, e))?;
            for (program, link) in links {
                let path = dir.join(program);
                let link = link.pin(&path).map_err(|e| BpfError::Pin(format!("{}: {e}", path.display())))?;
                held.push(HeldLink::Pinned(link));
            }
        }
        None => held.extend(links.into_iter().map(|(_, link)| HeldLink::Owned(link))),
    }
    let map = ebpf.map_mut(ACTIVE).ok_or(BpfError::MissingMap(ACTIVE))?;
    let mut active =
        aya::maps::Array::<_, u32>::try_from(map).map_err(|source| BpfError::Map { map: ACTIVE, source })?;
    active.set(0, generation, 0).map_err(|source| BpfError::Map { map: ACTIVE, source })?;
    if let Some(kept) = kept {
        let links = kept.dir.join("links");
        for entry in std::fs::read_dir(&links).map_err(|e| pin_error(&links, e))?.flatten() {
            if entry.file_name().to_string_lossy() != generation.to_string() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    Ok(held)
}

/// The names of an object's own maps (not its data sections), to pin them.
pub fn map_names(bytes: &[u8]) -> Vec<String> {
    match aya_obj::Object::parse(bytes) {
        Ok(obj) => obj.maps.keys().filter(|name| !name.starts_with('.')).cloned().collect(),
        Err(_) => Vec::new(),
    }
}

//! Builds the eBPF objects and the layout constants from `ebpf/`.
//!
//! One implementation, used by `cargo xtask build-ebpf` and by the agent's
//! build script (which includes this file with `#[path]`), so the two can
//! never build the programs differently. Standard library only.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The tools the build needs, each with the Debian package that ships it.
pub const TOOLS: &[(&str, &str)] = &[("clang", "clang"), ("llvm-strip", "llvm"), ("cc", "gcc")];
/// Headers the programs include, with their Debian package.
pub const HEADERS: &[(&str, &str)] = &[("/usr/include/bpf/bpf_helpers.h", "libbpf-dev")];

/// What is missing to build, as Debian package names.
pub fn missing_packages() -> Vec<&'static str> {
    let mut missing: Vec<&str> = TOOLS.iter().filter(|(tool, _)| !on_path(tool)).map(|(_, pkg)| *pkg).collect();
    missing.extend(HEADERS.iter().filter(|(h, _)| !Path::new(h).exists()).map(|(_, p)| *p));
    missing
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file())).unwrap_or(false)
}

/// The `*.bpf.c` sources of `ebpf_dir`, sorted.
pub fn sources(ebpf_dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(ebpf_dir).map_err(|e| format!("{}: {e}", ebpf_dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.to_string_lossy().ends_with(".bpf.c") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Every file whose change must rebuild the objects (for agent/build.rs;
/// xtask itself always rebuilds).
#[allow(dead_code)]
pub fn inputs(ebpf_dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut out = sources(ebpf_dir)?;
    for sub in ["include", "layout"] {
        let dir = ebpf_dir.join(sub);
        let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for entry in entries {
            out.push(entry.map_err(|e| e.to_string())?.path());
        }
    }
    out.sort();
    Ok(out)
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| format!("{shown}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{shown} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Compiles every program of `ebpf_dir` into `out_dir/<name>.bpf.o` (CO-RE,
/// with BTF, debug info stripped) and writes `out_dir/layout.rs`.
pub fn build(ebpf_dir: &Path, out_dir: &Path) -> Result<Vec<PathBuf>, String> {
    let missing = missing_packages();
    if !missing.is_empty() {
        return Err(format!(
            "missing build tools; install the Debian packages: {} (or run `cargo xtask build-ebpf`, which installs them)",
            missing.join(" ")
        ));
    }
    std::fs::create_dir_all(out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let include = ebpf_dir.join("include");
    let mut objects = Vec::new();
    for src in sources(ebpf_dir)? {
        let name = src.file_name().unwrap().to_string_lossy().replace(".bpf.c", ".bpf.o");
        let obj = out_dir.join(name);
        run(Command::new("clang")
            .args(["-g", "-O2", "-Wall", "-Werror", "-target", "bpf", "-D__TARGET_ARCH_x86"])
            .arg("-I")
            .arg(&include)
            // asm/types.h for <linux/types.h> when compiling for the BPF target
            .args(["-I", "/usr/include/x86_64-linux-gnu"])
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj))?;
        // drop DWARF, keep .BTF and .BTF.ext for CO-RE
        run(Command::new("llvm-strip").arg("-g").arg(&obj))?;
        objects.push(obj);
    }

    let probe = out_dir.join("layout-probe");
    run(Command::new("cc").arg("-I").arg(&include).arg(ebpf_dir.join("layout/layout.c")).arg("-o").arg(&probe))?;
    let out = Command::new(&probe).output().map_err(|e| format!("{}: {e}", probe.display()))?;
    if !out.status.success() {
        return Err(format!("{} failed", probe.display()));
    }
    std::fs::write(out_dir.join("layout.rs"), out.stdout).map_err(|e| e.to_string())?;
    Ok(objects)
}

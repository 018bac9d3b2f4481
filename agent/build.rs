//! Compiles ebpf/*.bpf.c into OUT_DIR for the agent to embed, with the same
//! code `cargo xtask build-ebpf` runs. Without clang it stops and says how to
//! get it.

#[path = "../xtask/src/ebpf.rs"]
mod ebpf;

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let ebpf_dir = manifest.join("../ebpf");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed=../xtask/src/ebpf.rs");
    for input in ebpf::inputs(&ebpf_dir).unwrap_or_default() {
        println!("cargo:rerun-if-changed={}", input.display());
    }
    commit(&manifest.join(".."));
    if let Err(e) = ebpf::build(&ebpf_dir, &out_dir) {
        eprintln!("error: building the eBPF programs failed: {e}");
        eprintln!("hint: run `cargo xtask build-ebpf` first; it installs clang, llvm and libbpf-dev when missing");
        std::process::exit(1);
    }
}

/// GIT_COMMIT for `nodescope_build_info`: as given (an image build
/// without the repository passes it), else the checkout's commit, else none
/// (the metric says "unknown"). Rebuilt when HEAD moves.
fn commit(repo: &std::path::Path) {
    println!("cargo:rerun-if-env-changed=GIT_COMMIT");
    if std::env::var_os("GIT_COMMIT").is_some() {
        return;
    }
    let git = repo.join(".git");
    if !git.is_dir() {
        return;
    }
    println!("cargo:rerun-if-changed={}", git.join("HEAD").display());
    if let Ok(head) = std::fs::read_to_string(git.join("HEAD")) {
        if let Some(r) = head.trim().strip_prefix("ref: ") {
            // a loose ref, or packed-refs when it is packed
            println!("cargo:rerun-if-changed={}", git.join(r).display());
            println!("cargo:rerun-if-changed={}", git.join("packed-refs").display());
        }
    }
    let out = std::process::Command::new("git").arg("-C").arg(repo).args(["rev-parse", "--short=12", "HEAD"]).output();
    if let Ok(out) = out {
        let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !hash.is_empty() {
            println!("cargo:rustc-env=GIT_COMMIT={hash}");
        }
    }
}

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
    if let Err(e) = ebpf::build(&ebpf_dir, &out_dir) {
        eprintln!("error: building the eBPF programs failed: {e}");
        eprintln!("hint: run `cargo xtask build-ebpf` first; it installs clang, llvm and libbpf-dev when missing");
        std::process::exit(1);
    }
}

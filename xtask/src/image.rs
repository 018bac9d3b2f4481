//! `cargo xtask image`: the agent's OCI image, built offline from the local
//! build. deploy/Containerfile's runtime stage starts FROM a distroless
//! image that needs a registry; this builds the same stage FROM scratch with
//! the host's loader and the libraries the binary links, and takes the
//! stage's ENTRYPOINT, CMD, LABEL, USER, EXPOSE and ENV lines from that file,
//! so both images run alike.
//!
//! `cargo xtask image [--binary PATH] [--tag NAME]`: without `--binary` it
//! runs `cargo build --release -p nodescope` first and uses
//! target/release/nodescope; the tag defaults to `localhost/nodescope:<version>`.
//! The tests include this file (`#[path]`) and call [`build`] with the
//! binary under test.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the image holds the agent (deploy/Containerfile's build stage installs it there).
pub const BIN_IN_IMAGE: &str = "/usr/local/bin/nodescope";

/// What the xtask builds from: the agent binary and the repository's deploy/Containerfile.
pub struct Spec<'a> {
    pub binary: &'a Path,
    pub containerfile: &'a Path,
    pub tag: &'a str,
}

pub fn image(args: &[String]) -> Result<(), String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().ok_or("xtask lives in the workspace")?.to_path_buf();
    let mut binary: Option<PathBuf> = None;
    let mut tag: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--binary" => binary = Some(it.next().ok_or("--binary needs a path")?.into()),
            "--tag" => tag = Some(it.next().ok_or("--tag needs a name")?.clone()),
            "-h" | "--help" => {
                println!("cargo xtask image [--binary PATH] [--tag NAME]");
                return Ok(());
            }
            other => return Err(format!("image: unknown argument {other:?} (see --help)")),
        }
    }
    let binary = match binary {
        Some(b) => b,
        None => {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let st = Command::new(cargo)
                .current_dir(&root)
                .args(["build", "--release", "-p", "nodescope"])
                .status()
                .map_err(|e| format!("cargo build: {e}"))?;
            if !st.success() {
                return Err(format!("cargo build --release -p nodescope exited with {st}"));
            }
            root.join("target/release/nodescope")
        }
    };
    let tag = match tag {
        Some(t) => t,
        None => format!("localhost/nodescope:{}", version(&binary)?),
    };
    let id = build(&Spec { binary: &binary, containerfile: &root.join("deploy/Containerfile"), tag: &tag })?;
    println!("{tag} {id}");
    Ok(())
}

/// The version `nodescope --version` prints.
pub fn version(binary: &Path) -> Result<String, String> {
    let out = Command::new(binary).arg("--version").output().map_err(|e| format!("{}: {e}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .map(str::to_string)
        .ok_or_else(|| format!("{} --version printed {text:?}", binary.display()))
}

/// The lines of the Containerfile's last stage that say how the image runs
/// (not how it is filled): ENTRYPOINT, CMD, LABEL, USER, EXPOSE, ENV,
/// WORKDIR, with their continuation lines.
pub fn runtime_lines(containerfile: &str) -> Result<Vec<String>, String> {
    // join continuation lines, drop comments and blanks
    let mut logical: Vec<String> = Vec::new();
    let mut cur = String::new();
    for line in containerfile.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                cur.push_str(part.trim_end());
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                logical.push(std::mem::take(&mut cur));
            }
        }
    }
    let last_from = logical
        .iter()
        .rposition(|l| l.split_whitespace().next().is_some_and(|w| w.eq_ignore_ascii_case("FROM")))
        .ok_or("no FROM line in the Containerfile")?;
    let keep = ["ENTRYPOINT", "CMD", "LABEL", "USER", "EXPOSE", "ENV", "WORKDIR"];
    let lines: Vec<String> = logical[last_from + 1..]
        .iter()
        .filter(|l| l.split_whitespace().next().is_some_and(|w| keep.iter().any(|k| w.eq_ignore_ascii_case(k))))
        .cloned()
        .collect();
    if !lines.iter().any(|l| l.to_ascii_uppercase().starts_with("ENTRYPOINT")) {
        return Err("the Containerfile's last stage has no ENTRYPOINT".into());
    }
    Ok(lines)
}

/// The shared libraries `ldd` lists for `binary`, and its loader.
pub fn libraries(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let out = Command::new("ldd").arg(binary).output().map_err(|e| format!("ldd {}: {e}", binary.display()))?;
    if !out.status.success() {
        return Err(format!("ldd {}: {}", binary.display(), String::from_utf8_lossy(&out.stderr)));
    }
    let mut libs: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let l = l.trim();
            let path = l.split_once("=>").map(|(_, rest)| rest.trim()).unwrap_or(l);
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    libs.sort();
    libs.dedup();
    Ok(libs)
}

/// The eBPF objects are compiled into the binary (agent/src/bpf: include_bytes
/// of net.bpf.o, disk.bpf.o, disk_syscalls.bpf.o): the image needs no other
/// file. Checked by the section names of their programs.
pub fn check_embedded_objects(binary: &Path) -> Result<(), String> {
    let bytes = std::fs::read(binary).map_err(|e| format!("{}: {e}", binary.display()))?;
    for section in ["tp_btf/inet_sock_set_state", "iter/tcp", "tp_btf/ext4_da_write_end", "tracepoint/syscalls/"] {
        if !bytes.windows(section.len()).any(|w| w == section.as_bytes()) {
            return Err(format!("{} holds no eBPF program in section {section}", binary.display()));
        }
    }
    Ok(())
}

/// The container tool: podman, else buildah.
fn tool() -> Result<&'static str, String> {
    let on_path =
        |t: &str| std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).any(|d| d.join(t).is_file());
    ["podman", "buildah"]
        .into_iter()
        .find(|t| on_path(t))
        .ok_or_else(|| "neither podman nor buildah is installed (Debian: apt-get install podman runc)".into())
}

/// Builds the image and returns its id.
pub fn build(spec: &Spec) -> Result<String, String> {
    check_embedded_objects(spec.binary)?;
    let containerfile =
        std::fs::read_to_string(spec.containerfile).map_err(|e| format!("{}: {e}", spec.containerfile.display()))?;
    let run_lines = runtime_lines(&containerfile)?;

    let ctx = std::env::temp_dir().join(format!("nodescope-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&ctx);
    let result = fill_and_build(spec, &ctx, &run_lines);
    let _ = std::fs::remove_dir_all(&ctx);
    result
}

fn fill_and_build(spec: &Spec, ctx: &Path, run_lines: &[String]) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let rootfs = ctx.join("rootfs");
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    let place = |host: &Path, inside: &Path, mode: u32| -> Result<(), String> {
        let dest = rootfs.join(inside.strip_prefix("/").unwrap_or(inside));
        std::fs::create_dir_all(dest.parent().unwrap()).map_err(|e| io(&dest.display().to_string(), e))?;
        // follows symlinks: the image holds the files themselves
        std::fs::copy(host, &dest).map_err(|e| io(&format!("copy {}", host.display()), e))?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io(&dest.display().to_string(), e))
    };
    place(spec.binary, Path::new(BIN_IN_IMAGE), 0o755)?;
    for lib in libraries(spec.binary)? {
        place(&lib, &lib, 0o755)?;
    }
    // root and nobody, as distroless has them; no shell
    let etc = rootfs.join("etc");
    std::fs::create_dir_all(etc.join("nodescope")).map_err(|e| io("etc", e))?;
    std::fs::write(
        etc.join("passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n",
    )
    .map_err(|e| io("etc/passwd", e))?;
    std::fs::write(etc.join("group"), "root:x:0:\nnogroup:x:65534:\n").map_err(|e| io("etc/group", e))?;
    for (dir, mode) in [("tmp", 0o1777), ("root", 0o700)] {
        let d = rootfs.join(dir);
        std::fs::create_dir_all(&d).map_err(|e| io(dir, e))?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).map_err(|e| io(dir, e))?;
    }
    let file = format!(
        "# made by `cargo xtask image` from {}'s runtime stage\nFROM scratch\nCOPY rootfs/ /\n{}\n",
        spec.containerfile.display(),
        run_lines.join("\n")
    );
    std::fs::write(ctx.join("Containerfile"), file).map_err(|e| io("Containerfile", e))?;

    let tool = tool()?;
    let mut cmd = Command::new(tool);
    if tool == "podman" {
        cmd.args(["build", "--pull=never"]);
    } else {
        cmd.args(["bud", "--pull-never"]);
    }
    cmd.args(["-q", "--layers=false", "-t", spec.tag, "-f"]).arg(ctx.join("Containerfile")).arg(ctx);
    let out = cmd.output().map_err(|e| format!("{tool} build: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{tool} build exited with {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let id = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_string();
    Ok(id)
}

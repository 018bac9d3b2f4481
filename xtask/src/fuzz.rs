//! `cargo xtask fuzz --seconds N [TARGET...]`: the agent's parsers under
//! libFuzzer, through cargo-fuzz on the nightly toolchain. The targets are
//! agent/fuzz/fuzz_targets/*.rs; each runs for N seconds in one fuzzer
//! process, after one build of them all. New inputs go to a scratch corpus
//! under target/fuzz/corpus/<target> (kept between runs), so the committed
//! seeds in agent/fuzz/corpus/<target> are read and never written.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::{output, status};

/// The cargo-fuzz release installed when `cargo fuzz` is missing.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// libFuzzer and its sanitizer flags need the nightly compiler.
const TOOLCHAIN: &str = "nightly";
/// An input that takes longer than this (seconds) is reported as a hang.
const INPUT_TIMEOUT: u64 = 10;

/// How the targets are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// Optimized, with AddressSanitizer: what finds the most per second
    /// (`cargo xtask fuzz`).
    Full,
    /// Unoptimized, without a sanitizer, overflow checks on: the CI smoke,
    /// whose time goes mostly into building the whole dependency tree with
    /// coverage instrumentation (about a quarter of the full build's).
    Smoke,
}

impl Build {
    fn flags(self) -> &'static [&'static str] {
        match self {
            Build::Full => &[],
            Build::Smoke => &["--dev", "--sanitizer", "none"],
        }
    }
}

/// What one target's run did.
struct Outcome {
    target: String,
    /// Wall time of the run, build check included.
    seconds: f64,
    /// Seconds libFuzzer says it fuzzed for (none after a crash).
    fuzzed: Option<u64>,
    executions: Option<u64>,
    exec_per_sec: Option<u64>,
    corpus: Option<u64>,
    /// The input that crashed (or hung) it, as libFuzzer wrote it.
    crash: Option<String>,
    failed: bool,
    log: PathBuf,
}

impl Outcome {
    /// Nothing known yet of `target`'s run, whose output goes to `log`.
    fn new(target: &str, log: PathBuf) -> Outcome {
        Outcome {
            target: target.to_string(),
            seconds: 0.0,
            fuzzed: None,
            executions: None,
            exec_per_sec: None,
            corpus: None,
            crash: None,
            failed: false,
            log,
        }
    }
}

fn fuzz_dir(root: &Path) -> PathBuf {
    root.join("agent/fuzz")
}

/// `cargo` of the nightly toolchain, through rustup (the `CARGO` this task
/// runs under is the stable one).
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", TOOLCHAIN, "cargo"]);
    cmd
}

fn ensure_nightly() -> Result<(), String> {
    if output(Command::new("rustup").args(["run", TOOLCHAIN, "rustc", "--version"])).is_some() {
        return Ok(());
    }
    eprintln!("xtask: installing the {TOOLCHAIN} toolchain");
    status(Command::new("rustup").args(["toolchain", "install", TOOLCHAIN, "--profile", "minimal"]))
}

fn ensure_cargo_fuzz() -> Result<(), String> {
    if output(nightly_cargo().args(["fuzz", "--version"])).is_some() {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    status(Command::new("cargo").args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ_VERSION]))
}

/// The fuzz targets: the files of agent/fuzz/fuzz_targets, sorted.
pub fn targets(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fuzz_dir(root).join("fuzz_targets"))
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".rs").map(str::to_string)).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// Builds every target, runs each of `wanted` (all when empty) for
/// `seconds`, prints what each did; Err names every target that crashed and
/// the input that did it.
pub fn fuzz(root: &Path, seconds: u64, wanted: &[String], build: Build) -> Result<(), String> {
    let all = targets(root);
    if let Some(unknown) = wanted.iter().find(|w| !all.contains(w)) {
        return Err(format!("no fuzz target {unknown:?}; there are: {}", all.join(", ")));
    }
    let chosen: Vec<String> = if wanted.is_empty() { all } else { wanted.to_vec() };
    ensure_nightly()?;
    ensure_cargo_fuzz()?;
    let built = Instant::now();
    status(
        nightly_cargo()
            .current_dir(root.join("agent"))
            .args(["fuzz", "build", "--fuzz-dir", "fuzz"])
            .args(build.flags()),
    )?;
    eprintln!("xtask: fuzz targets built in {:.0} s", built.elapsed().as_secs_f64());

    let mut outcomes = Vec::new();
    for target in &chosen {
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        let o = run_target(root, target, seconds, build)?;
        println!(
            "{:<10} {:>6} s  {:>11} execs  {:>7} exec/s  corpus {:>5}{}",
            o.target,
            o.fuzzed.unwrap_or(o.seconds.round() as u64),
            shown(o.executions),
            shown(o.exec_per_sec),
            shown(o.corpus),
            if o.crash.is_some() || o.failed { "  CRASHED" } else { "" },
        );
        outcomes.push(o);
    }
    let crashed: Vec<String> = outcomes
        .iter()
        .filter(|o| o.crash.is_some() || o.failed)
        .map(|o| match &o.crash {
            Some(artifact) => format!("fuzz target {} crashed: {artifact}", o.target),
            None => format!("fuzz target {} failed without a crash input; see {}", o.target, o.log.display()),
        })
        .collect();
    if crashed.is_empty() {
        Ok(())
    } else {
        Err(crashed.join("\n"))
    }
}

fn shown(v: Option<u64>) -> String {
    v.map_or_else(|| "?".into(), |v| v.to_string())
}

/// One target for `seconds`: libFuzzer's output goes to
/// target/fuzz/logs/<target>.log and is read for its final figures.
fn run_target(root: &Path, target: &str, seconds: u64, build: Build) -> Result<Outcome, String> {
    let scratch = root.join("target/fuzz/corpus").join(target);
    let seeds = fuzz_dir(root).join("corpus").join(target);
    let logs = root.join("target/fuzz/logs");
    for dir in [&scratch, &logs] {
        std::fs::create_dir_all(dir).map_err(|e| format!("making {}: {e}", dir.display()))?;
    }
    let log_path = logs.join(format!("{target}.log"));
    let mut log = File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut cmd = nightly_cargo();
    cmd.current_dir(root.join("agent"))
        .args(["fuzz", "run", "--fuzz-dir", "fuzz", "--jobs", "1"])
        .args(build.flags())
        .arg(target)
        .arg(&scratch)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT}"))
        .arg("-print_final_stats=1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("{cmd:?}: {e}"))?;
    let mut o = Outcome::new(target, log_path.clone());
    let stderr = child.stderr.take().expect("piped");
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        let _ = writeln!(log, "{line}");
        read_line(&line, &mut o);
    }
    let st = child.wait().map_err(|e| format!("{cmd:?}: {e}"))?;
    // libFuzzer names it relative to where it ran
    o.crash = o.crash.map(|a| root.join("agent").join(a).display().to_string());
    o.seconds = started.elapsed().as_secs_f64();
    o.failed = !st.success();
    if o.failed {
        // the end of libFuzzer's report, for the one reading CI's output
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("{}", lines[lines.len().saturating_sub(40)..].join("\n"));
    }
    Ok(o)
}

/// Takes libFuzzer's final figures and the crash input's path from one line
/// of its output.
fn read_line(line: &str, o: &mut Outcome) {
    let stat = |name: &str| line.strip_prefix(name).and_then(|v| v.trim().parse().ok());
    if let Some(v) = stat("stat::number_of_executed_units:") {
        o.executions = Some(v);
    } else if let Some(v) = stat("stat::average_exec_per_sec:") {
        o.exec_per_sec = Some(v);
    } else if let Some(secs) = line.strip_prefix("Done ").and_then(|r| r.split(" runs in ").nth(1)) {
        // libFuzzer's own time, without the build before it
        o.fuzzed = secs.split(' ').next().and_then(|s| s.parse().ok());
    } else if let Some(i) = line.find("Test unit written to ") {
        o.crash = Some(line[i + "Test unit written to ".len()..].trim().to_string());
    }
    // status lines: `#1234	NEW    cov: 5 ft: 6 corp: 7/89b ...`
    if line.starts_with('#') {
        if let Some(n) = line.split("corp: ").nth(1).and_then(|r| r.split('/').next()).and_then(|n| n.parse().ok()) {
            o.corpus = Some(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_from_libfuzzer_output() {
        let mut o = Outcome::new("t", PathBuf::new());
        for line in [
            "#2\tINITED cov: 120 ft: 121 corp: 5/310b exec/s: 0 rss: 40Mb",
            "#4096\tpulse  cov: 300 ft: 500 corp: 42/2048b lim: 43 exec/s: 2048 rss: 45Mb",
            "Done 51234 runs in 6 second(s)",
            "stat::number_of_executed_units: 51234",
            "stat::average_exec_per_sec:     8539",
            "artifact_prefix='/r/agent/fuzz/artifacts/config/'; Test unit written to /r/agent/fuzz/artifacts/config/crash-ab12",
        ] {
            read_line(line, &mut o);
        }
        assert_eq!((o.executions, o.exec_per_sec, o.corpus), (Some(51234), Some(8539), Some(42)));
        assert_eq!(o.fuzzed, Some(6));
        assert_eq!(o.crash.as_deref(), Some("/r/agent/fuzz/artifacts/config/crash-ab12"));
    }

    #[test]
    fn every_target_has_seeds() {
        let root = crate::root();
        let names = targets(&root);
        for wanted in ["chainlog", "classes", "config", "discovery", "http", "procfs"] {
            assert!(names.iter().any(|n| n == wanted), "{wanted} missing from {names:?}");
        }
        for t in &names {
            let seeds = fuzz_dir(&root).join("corpus").join(t);
            assert!(std::fs::read_dir(&seeds).map(|d| d.count() > 0).unwrap_or(false), "{} empty", seeds.display());
        }
    }
}

//! nodescope: watches a blockchain node from the outside with eBPF, procfs
//! and cgroups, and serves what it sees as metrics and health verdicts.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use nodescope::config::Config;
use nodescope::{agent, bpf, caps, disk, net, resources, settings, telemetry, top};

#[derive(Parser)]
#[command(
    name = "nodescope",
    version,
    about = "Watches a blockchain node from the outside: eBPF on its sockets and files, procfs and cgroups"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        /// TOML config; without it nodescope finds nodes on the host itself.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Enter this cgroup namespace first (`/proc/1/ns/cgroup` in a pod
        /// with hostPID), so nodes' cgroup paths are the host's.
        #[arg(long, value_name = "NS_FILE")]
        cgroupns: Option<PathBuf>,
        /// Start every counter from zero: drop the state file and the
        /// kernel state a previous agent left (see `agent.state_dir`).
        #[arg(long)]
        fresh: bool,
    },
    /// Validate a config file: exit 0, or 2 naming the bad key.
    CheckConfig { file: PathBuf },
    /// List each kernel hook nodescope uses and whether this kernel supports it,
    /// and whether the disk hooks see each target's data dir.
    Probes {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Config naming the targets (and the disk method); without it the
        /// nodes found on the host.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// A live terminal view of a running agent: health, peers by bytes/s,
    /// churn, file writes and fsync latency, disk space. Needs no privilege.
    Top {
        /// The agent's HTTP address.
        #[arg(long, default_value = "http://127.0.0.1:9464")]
        url: String,
        /// Print one plain-text table and exit.
        #[arg(long)]
        once: bool,
        /// How often to read the agent (e.g. 1s, 500ms).
        #[arg(long, default_value = "1s", value_parser = top::parse_interval)]
        interval: std::time::Duration,
    },
}

/// Exit code for a config the agent refuses.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match settings::load(Some(&file)) {
            Ok(c) => {
                println!(
                    "{}: ok ({} targets{})",
                    file.display(),
                    c.targets.len(),
                    if c.targets.is_empty() { ", discovery" } else { "" }
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("nodescope: config error: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run { config, cgroupns, fresh } => {
            let config = match settings::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("nodescope: config error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            init_logging(&config);
            // before any thread starts: a namespace switch is per thread
            caps::check_at_start(cgroupns.as_deref());
            match agent::run(config, fresh) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Top { url, once, interval } => top::run(top::Options { url, once, interval }),
        Command::Probes { json, config } => {
            let config = match settings::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("nodescope: config error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let mut hooks = net::probe::probe_hooks();
            let disk_hooks = disk::probe::probe_hooks();
            let datadirs = disk::coverage::probe_datadirs(&config, &disk_hooks);
            hooks.extend(disk_hooks);
            hooks.extend(resources::probe::probe_sources());
            // exit 1 when this kernel refuses a hook; a data dir the hooks do
            // not see is reported (covered NO) but is the host's choice
            let all_supported = hooks.iter().all(|h| h.supported);
            hooks.extend(datadirs);
            // a closed pipe (`nodescope probes | head`) is not an error worth a panic
            let _ = print_hooks(&hooks, json);
            if all_supported {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn print_hooks(hooks: &[bpf::HookStatus], json: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if json {
        return writeln!(out, "{}", serde_json::to_string_pretty(hooks).expect("serializable"));
    }
    writeln!(out, "{:<13} {:<46} {:<28} {:<9} detail", "signal", "hook", "program", "supported")?;
    for h in hooks {
        let supported = if h.supported { "yes" } else { "NO" };
        writeln!(out, "{:<13} {:<46} {:<28} {:<9} {}", h.signal, h.hook, h.program, supported, h.detail)?;
    }
    Ok(())
}

fn init_logging(config: &Config) {
    telemetry::init_logging(config);
}

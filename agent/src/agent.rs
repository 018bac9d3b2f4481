//! `nodescope run`: wires the signals, the telemetry pipeline and the HTTP
//! listener, and drives the collection loop.
//!
//! Data flows one way: kernel maps and procfs -> a snapshot per signal
//! (published each interval) -> instruments and HTTP handlers.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;

use crate::cgroup::Mounts;
use crate::config::Config;
use crate::disk::DiskSnapshot;
use crate::health::{self, HealthEngine, HealthSnapshot};
use crate::http::{self, AppState};
use crate::net::NetSnapshot;
use crate::resources::ResourceSnapshot;
use crate::scope::{ScopeMemory, ScopePlan};
use crate::signal::Signal;
use crate::snapshot::{LoopStatus, Shared};
use crate::target::Targets;
use crate::telemetry::Telemetry;

/// Below this soft RLIMIT_NOFILE the start-up log warns: the signals'
/// objects, the state files and the default connection bounds fit in it.
const MIN_DESCRIPTORS: u64 = 512;

pub fn run(config: Config, fresh: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("nodescope-io")
        .build()
        .context("starting the async runtime")?;

    // Across restarts (crate::state, bpf::pins): what the last agent left.
    let (state_file, mut saved) = match &config.agent.state_dir {
        Some(dir) => match crate::state::StateFile::open(dir, fresh) {
            Ok((file, saved)) => (Some(file), saved),
            // two agents on one state would both take the kernel side over
            Err(e @ crate::state::StateError::Locked(_)) => return Err(e.into()),
            // a directory it cannot write: it runs, counting from zero at each start
            Err(e) => {
                tracing::error!("{e}; counters are not kept across restarts");
                (None, None)
            }
        },
        None => (None, None),
    };
    let pins = state_file.as_ref().and_then(|_| {
        crate::bpf::pins::Pins::prepare(&config.agent.pin_dir, fresh)
            .inspect_err(|e| {
                tracing::warn!("kernel side not kept across restarts: {e}; connections that open and close while no agent runs are not counted")
            })
            .ok()
    });

    // The listener is bound before any eBPF object is loaded: each holds
    // descriptors (about 90 for all signals), and under a low RLIMIT_NOFILE
    // a signal the kernel cannot open is off and reported, whereas a
    // listener that cannot bind leaves no probe to answer.
    match http::raise_descriptor_limit() {
        Some(limit) if limit < MIN_DESCRIPTORS => tracing::warn!(
            "RLIMIT_NOFILE is {limit}: the eBPF signals hold about 90 descriptors and each HTTP connection one; \
             some signals may be off and connections few (LimitNOFILE= in the unit raises it)"
        ),
        Some(_) => {}
        None => tracing::warn!("RLIMIT_NOFILE unknown: getrlimit failed"),
    }
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(config.http.listen))
        .with_context(|| format!("http.listen: binding {}", config.http.listen))?;

    let telemetry = Arc::new(Telemetry::new(&config, runtime.handle())?);
    let meter = telemetry.meter();

    let loop_status = Shared::<LoopStatus>::default();
    // the agent's own figures: its eBPF programs and maps, collection and scrape times
    let bpf_self = Shared::<crate::selfmetrics::BpfSelfSnapshot>::default();
    let self_metrics = crate::selfmetrics::SelfMetrics::register(&meter, bpf_self.clone());

    // Each signal registers its own instruments on the one meter and
    // publishes a snapshot per interval; a signal the kernel refuses is off
    // (logged by its module) and the others go on.
    let net_snapshot = Shared::<NetSnapshot>::default();
    let disk_snapshot = Shared::<DiskSnapshot>::default();
    let resources_snapshot = Shared::<ResourceSnapshot>::default();
    let chain_snapshot = Shared::<crate::chainlog::ChainSnapshot>::default();
    let kept_net = pins.as_ref().map(|p| p.object("net.bpf.o"));
    // disk first: loading an object holds a parse of the kernel's BTF (about
    // 19 MB at its height), which the network signal's per-peer instruments,
    // registered after its own load, must not add to (docs/benchmarks.md)
    let disk = crate::disk::start(&config.disk, &meter, disk_snapshot.clone());
    let net = crate::net::start(&config.limits, &meter, net_snapshot.clone(), kept_net.as_ref());
    let probes_attached = net.is_some();
    release_freed_memory();
    let mut signals: Vec<Box<dyn Signal>> = net
        .into_iter()
        .chain(disk)
        .chain([crate::resources::start(&config.resources, &meter, resources_snapshot.clone())])
        .chain([crate::chainlog::start(&meter, chain_snapshot.clone())])
        .collect();
    // health, over the snapshots of the signals above
    let mut health_engine = HealthEngine::new(&config);
    let health_snapshot = Shared::<HealthSnapshot>::default();
    health_snapshot.publish(health_engine.initial());
    health::metrics::register(&meter, health_snapshot.clone());

    let mounts = Mounts::read().unwrap_or_else(|e| {
        tracing::warn!("reading /proc/self/mountinfo: {e}; cgroup scoping off");
        Mounts::default()
    });
    if mounts.v2.is_none() {
        tracing::warn!("no cgroup2 hierarchy mounted: nodes are scoped by process and listening ports");
    }
    let cgroup2 = mounts.v2.clone();
    let mut targets = Targets::new(&config, mounts);
    if let Some(saved) = saved.as_mut() {
        targets.restore_slots(&saved.slots);
        for signal in signals.iter_mut() {
            if let Some(part) = saved.signals.remove(signal.name()) {
                signal.restore(part);
            }
        }
    }
    let mut last_save_error: Option<String> = None;
    if targets.is_discovering() {
        tracing::info!("no [[targets]] configured: looking for bitcoind, litecoind and monerod on this host");
    }

    // the port the kernel gave when http.listen asks for port 0
    let bound = listener.local_addr().unwrap_or(config.http.listen);
    tracing::info!("serving /metrics and /peers on http://{bound}");
    let state = Arc::new(AppState {
        telemetry: telemetry.clone(),
        net: net_snapshot.clone(),
        loop_status: loop_status.clone(),
        health: health_snapshot.clone(),
        self_metrics: self_metrics.clone(),
    });
    let (mut stop_http, stop_rx) = tokio::sync::watch::channel(false);
    let guard = Arc::new(http::HttpGuard::new(&config.http, &meter));
    let mut server = runtime.spawn(http::serve(listener, state.clone(), guard.clone(), stop_rx));

    // Signals end the loop through this channel; the kernel's exec events
    // wake it to resolve a node that just started.
    let (stop_tx, stop) = mpsc::channel::<Wake>();
    let rings: Vec<_> = signals.iter_mut().filter_map(|s| s.take_scope_events()).collect();
    crate::scope::watch_events(rings, stop_tx.clone(), Wake::Scope);
    {
        use tokio::signal::unix::{signal, SignalKind};
        // the handlers register with the runtime's reactor
        let _runtime = runtime.enter();
        let stop_tx = stop_tx.clone();
        // SIGHUP reloads the config; SIGUSR1 and SIGUSR2 (which would
        // otherwise end the process) are taken and logged, nothing more
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let mut usr1 = signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?;
        let mut usr2 = signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?;
        runtime.spawn(async move {
            loop {
                tokio::select! {
                    _ = hup.recv() => {
                        if stop_tx.send(Wake::Reload).is_err() {
                            return;
                        }
                    }
                    _ = usr1.recv() => tracing::info!("SIGUSR1: nothing to do (SIGHUP reloads the config)"),
                    _ = usr2.recv() => tracing::info!("SIGUSR2: nothing to do (SIGHUP reloads the config)"),
                }
            }
        });
        ignore_stray_signals(&runtime)?;
    }
    runtime.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).ok();
        // SIGQUIT asks for a stop too: a clean one rather than a core dump
        let mut quit = signal(SignalKind::quit()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = delivered(term.as_mut()) => {}
            _ = delivered(quit.as_mut()) => {}
        }
        let _ = stop_tx.send(Wake::Stop);
    });

    let mut config = config;
    let mut interval = config.agent.interval;
    // Under systemd (Type=notify): READY once the first collection is done,
    // then watchdog pings, so a stuck loop gets the agent restarted.
    let mut watchdog_usec = 0;
    // Pinged at half the period systemd expects, also while the loop waits
    // out a long interval; a collection that hangs stops the pings.
    let watchdog_period = sd_notify::watchdog_enabled(false, &mut watchdog_usec)
        .then(|| std::time::Duration::from_micros(watchdog_usec / 2));
    let mut ready_sent = false;
    let mut scope_memory = ScopeMemory::default();
    let proc_root = std::path::Path::new("/proc");
    // Resolves the targets and points the kernel's scope maps at them.
    let mut rescope = |targets: &mut Targets, signals: &mut [Box<dyn Signal>]| {
        let _span = tracing::info_span!("scope").entered();
        targets.refresh();
        let plan = ScopePlan::build(
            proc_root,
            targets.current(),
            &targets.exec_names(),
            cgroup2.as_deref(),
            &mut scope_memory,
        );
        for signal in signals.iter_mut() {
            signal.set_scope(&plan, targets.current());
        }
        plan
    };
    'collect: loop {
        let started = Instant::now();
        // one span per collection cycle (exported with the agent's logs when OTLP is set)
        let cycle = tracing::info_span!("collection", run = loop_status.get().runs + 1).entered();
        let plan = rescope(&mut targets, &mut signals);
        let current = targets.current();
        for signal in signals.iter_mut() {
            signal.collect(current, &plan);
        }
        // before this collection's figures are served: whoever sees them
        // can count on the next agent going on from them
        if let Some(state) = &state_file {
            let saved = crate::state::Saved {
                layout: crate::bpf::abi::LAYOUT_VERSION,
                saved_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                slots: targets.slots().clone(),
                signals: signals.iter().filter_map(|s| Some((s.name().to_string(), s.save()?))).collect(),
            };
            match state.save(&saved) {
                Ok(()) => last_save_error = None,
                Err(e) => {
                    let msg = e.to_string();
                    if last_save_error.as_deref() != Some(msg.as_str()) {
                        tracing::error!("saving the state file in agent.state_dir: {msg}");
                        last_save_error = Some(msg);
                    }
                }
            }
        }
        // after every signal has published this interval's snapshot
        let verdicts = tracing::info_span!("health").in_scope(|| {
            health_engine.evaluate(&health::Inputs {
                targets: current,
                net: &net_snapshot.get(),
                disk: &disk_snapshot.get(),
                resources: &resources_snapshot.get(),
                chain: &chain_snapshot.get(),
                probes_attached,
            })
        });
        health_snapshot.publish(verdicts);
        loop_status.publish(LoopStatus { last_run: Some(Instant::now()), runs: loop_status.get().runs + 1, interval });
        bpf_self.publish(crate::selfmetrics::read_bpf());
        self_metrics.collected(started.elapsed());
        // /metrics serves this collection's figures until the next one
        telemetry.refresh();
        if !ready_sent {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
            ready_sent = true;
        }
        drop(cycle);
        loop {
            match wait_for_next(&stop, started + interval, watchdog_period) {
                Wake::Stop => break 'collect,
                Wake::Interval => break,
                Wake::Reload => {
                    if let Some((new, listener)) = reload(&config, &self_metrics, &telemetry, &runtime) {
                        if let Some(listener) = listener {
                            // the new address serves from now on; the old
                            // listener stops accepting (its open connections
                            // finish on their own)
                            let bound = listener.local_addr().unwrap_or(new.http.listen);
                            let (stop, stop_rx) = tokio::sync::watch::channel(false);
                            let _ = std::mem::replace(&mut stop_http, stop).send(true);
                            server = runtime.spawn(http::serve(listener, state.clone(), guard.clone(), stop_rx));
                            tracing::info!("SIGHUP: serving /metrics and /peers on http://{bound} now");
                        }
                        targets.reconfigure(&new);
                        guard.reconfigure(&new.http);
                        health_engine.reconfigure(&new);
                        interval = new.agent.interval;
                        config = new;
                        // the new targets watched and collected now
                        break;
                    }
                }
                // a node started: watch it now, not at the next interval
                Wake::Scope => drop(rescope(&mut targets, &mut signals)),
            }
        }
    }

    tracing::info!("stopping");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let _ = stop_http.send(true);
    let _ = runtime.block_on(server);
    telemetry.shutdown();
    crate::telemetry::shutdown_logging();
    Ok(())
}

/// The config file read again (with the environment's overrides) on
/// SIGHUP. None when it is refused: logged with the same one-line reason as
/// `check-config`, counted, and the running config kept. Targets, rules,
/// thresholds, the interval and the HTTP bounds apply at once, and so does
/// `[otlp]` (the standard OTEL_* variables still over it): when it resolves
/// to other settings, the metric, span and log exporters are built anew
/// (an exporter that cannot be built refuses the reload) and swapped in, the
/// instruments and their values kept. A new `http.listen` is bound here,
/// and returned for the loop to serve on (an address that cannot be bound
/// refuses the reload). What is fixed at start (kernel map sizes, logging)
/// is named in a warning when it changed, and applies at the next start.
fn reload(
    running: &Config,
    self_metrics: &crate::selfmetrics::SelfMetrics,
    telemetry: &Telemetry,
    runtime: &tokio::runtime::Runtime,
) -> Option<(Config, Option<tokio::net::TcpListener>)> {
    use std::sync::atomic::Ordering;
    let source = running.source.as_deref();
    let shown = source.map_or("(no file: environment only)".to_string(), |p| p.display().to_string());
    let loaded = crate::settings::load(source).map_err(|e| e.to_string());
    let (new, otlp) = match loaded.and_then(|c| telemetry.prepare_otlp(&c).map(|o| (c, o))) {
        Ok(c) => c,
        Err(e) => {
            self_metrics.counters.reloads_rejected.fetch_add(1, Ordering::Relaxed);
            tracing::error!("SIGHUP: config error: {e}; still running the config loaded before from {shown}");
            return None;
        }
    };
    let mut listener = None;
    if running.http.listen != new.http.listen {
        match runtime.block_on(tokio::net::TcpListener::bind(new.http.listen)) {
            Ok(l) => listener = Some(l),
            Err(e) => {
                self_metrics.counters.reloads_rejected.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    "SIGHUP: http.listen: binding {}: {e}; still running the config loaded before from {shown}",
                    new.http.listen
                );
                return None;
            }
        }
    }
    let mut fixed = Vec::new();
    let differs = |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    if differs(&running.limits, &new.limits) {
        fixed.push("[limits]");
    }
    if differs(&running.log, &new.log) {
        fixed.push("[log]");
    }
    if differs(&running.disk, &new.disk) {
        fixed.push("[disk]");
    }
    if differs(&running.resources, &new.resources) {
        fixed.push("[resources]");
    }
    if !fixed.is_empty() {
        tracing::warn!("SIGHUP: {} changed in {shown}: they apply at the next start", fixed.join(", "));
    }
    if let Some(change) = otlp {
        tracing::info!("SIGHUP: [otlp] changed: {}", change.describe());
        telemetry.apply_otlp(change, true);
    }
    self_metrics.counters.reloads_applied.fetch_add(1, Ordering::Relaxed);
    let names: Vec<&str> = new.targets.iter().map(|t| t.name.as_str()).collect();
    tracing::info!(
        "SIGHUP: config reloaded from {shown}: {} targets {names:?}, {} rule settings, interval {:?}",
        new.targets.len(),
        new.rules.len(),
        new.agent.interval
    );
    Some((new, listener))
}

/// What wakes the collection loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The next interval is due.
    Interval,
    /// A process exec'd under a watched node's name.
    Scope,
    /// SIGTERM or Ctrl-C.
    Stop,
    /// SIGHUP: read the config again.
    Reload,
}

/// Waits until `deadline`, pinging the systemd watchdog every `watchdog`
/// period meanwhile; returns early for a stop or a scope event.
fn wait_for_next(stop: &mpsc::Receiver<Wake>, deadline: Instant, watchdog: Option<std::time::Duration>) -> Wake {
    loop {
        if watchdog.is_some() {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Wake::Interval;
        }
        let step = watchdog.map_or(left, |w| w.min(left));
        match stop.recv_timeout(step) {
            Ok(wake) => return wake,
            Err(RecvTimeoutError::Disconnected) => return Wake::Stop,
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

/// Hands the heap pages freed by the programs' loads (the BTF parses: tens
/// of thousands of small allocations under the ones that stay) back to the
/// kernel, which glibc does only for free memory at the heap's top.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free pages; no pointer is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The next delivery of `s`; never, when its handler could not be installed.
async fn delivered(s: Option<&mut tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// Signals whose default action ends the process but which mean nothing to
/// the agent (timers, I/O readiness, power, CPU and file-size limits, the
/// real-time range): a stray `kill -ALRM` must not stop the watching. Each
/// named one is taken and logged; the real-time ones are ignored outright.
/// The faults (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGTRAP, SIGSYS) keep
/// their default: the process is broken when one arrives.
fn ignore_stray_signals(runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let _runtime = runtime.enter();
    for (name, number) in [
        ("SIGALRM", libc::SIGALRM),
        ("SIGVTALRM", libc::SIGVTALRM),
        ("SIGPROF", libc::SIGPROF),
        ("SIGIO", libc::SIGIO),
        ("SIGPWR", libc::SIGPWR),
        ("SIGSTKFLT", libc::SIGSTKFLT),
        ("SIGXCPU", libc::SIGXCPU),
        ("SIGXFSZ", libc::SIGXFSZ),
    ] {
        let mut s = signal(SignalKind::from_raw(number)).with_context(|| format!("installing the {name} handler"))?;
        runtime.spawn(async move {
            while s.recv().await.is_some() {
                tracing::info!("{name}: ignored");
            }
        });
    }
    for number in libc::SIGRTMIN()..=libc::SIGRTMAX() {
        // SAFETY: SIG_IGN for a real-time signal, before any of them can be
        // wanted by anything else in the process; no handler runs
        unsafe { libc::signal(number, libc::SIG_IGN) };
    }
    Ok(())
}

//! OTLP export settings as collectors and the OpenTelemetry specification
//! expect them: `[otlp]` in the config, overridden by the standard
//! environment (`OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT`, `..._PROTOCOL`,
//! `..._HEADERS`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`), the
//! exporter itself (HTTP/protobuf or gRPC), and a wrapper that counts
//! failed exports and logs them at a bounded rate.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{ManualReader, Temporality};
use opentelemetry_sdk::Resource;

use crate::config::{OtlpConfig, OtlpProtocol};

/// The export as resolved from the config and the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpSettings {
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    pub headers: BTreeMap<String, String>,
    pub interval: Duration,
    pub timeout: Duration,
}

impl OtlpProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            OtlpProtocol::HttpProtobuf => "http/protobuf",
            OtlpProtocol::Grpc => "grpc",
        }
    }
}

/// An environment variable: None when unset or empty; an error naming it
/// when it is not UTF-8.
pub type Env<'a> = &'a dyn Fn(&str) -> Result<Option<String>, String>;

/// The process environment.
pub fn process_env(name: &str) -> Result<Option<String>, String> {
    match std::env::var_os(name) {
        None => Ok(None),
        Some(v) => match v.into_string() {
            Ok(s) if s.trim().is_empty() => Ok(None),
            Ok(s) => Ok(Some(s)),
            Err(_) => Err(format!("{name}: not UTF-8")),
        },
    }
}

/// `%XX` escapes decoded (W3C baggage octets, as OTEL_RESOURCE_ATTRIBUTES
/// and OTEL_EXPORTER_OTLP_HEADERS write them).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `k1=v1,k2=v2` (values percent-decoded); `name` is the variable, for the error.
fn key_values(name: &str, list: &str) -> Result<Vec<(String, String)>, String> {
    list.split(',')
        .filter(|kv| !kv.trim().is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').ok_or_else(|| format!("{name}: {kv:?} is not key=value"))?;
            let k = k.trim();
            if k.is_empty() {
                return Err(format!("{name}: {kv:?} has no key"));
            }
            Ok((percent_decode(k), percent_decode(v.trim())))
        })
        .collect()
}

/// The config's `[otlp]` with the standard variables over it: the
/// metrics-specific variable over the general one over the TOML key. The
/// general endpoint is a base URL for http/protobuf (`/v1/metrics` is
/// appended), the specific one and `otlp.endpoint` are used as they are.
/// None: no endpoint anywhere, no export.
pub fn resolve(config: &OtlpConfig, env: Env<'_>) -> Result<Option<OtlpSettings>, String> {
    let pick = |specific: &str, general: &str| -> Result<Option<(String, bool)>, String> {
        if let Some(v) = env(specific)? {
            return Ok(Some((v, true)));
        }
        Ok(env(general)?.map(|v| (v, false)))
    };
    let protocol = match pick("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")? {
        None => config.protocol,
        Some((p, specific)) => match p.trim() {
            "grpc" => OtlpProtocol::Grpc,
            "http/protobuf" => OtlpProtocol::HttpProtobuf,
            other => {
                let name = if specific { "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL" } else { "OTEL_EXPORTER_OTLP_PROTOCOL" };
                return Err(format!("{name}: {other:?} is not supported (grpc or http/protobuf)"));
            }
        },
    };
    let endpoint = match pick("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")? {
        Some((e, true)) => Some(e.trim().to_string()),
        Some((e, false)) => Some(match protocol {
            OtlpProtocol::HttpProtobuf => format!("{}/v1/metrics", e.trim().trim_end_matches('/')),
            OtlpProtocol::Grpc => e.trim().to_string(),
        }),
        None => config.endpoint.clone(),
    };
    let Some(endpoint) = endpoint else { return Ok(None) };
    if !endpoint.starts_with("http://") || endpoint.len() <= "http://".len() {
        return Err(format!("OTLP endpoint {endpoint:?}: must be an http:// URL (TLS is left to a local collector)"));
    }
    let mut headers = config.headers.clone();
    for name in ["OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_METRICS_HEADERS"] {
        if let Some(list) = env(name)? {
            headers.extend(key_values(name, &list)?);
        }
    }
    Ok(Some(OtlpSettings { endpoint, protocol, headers, interval: config.interval, timeout: config.timeout }))
}

/// The endpoint of another signal (`traces`, `logs`) of the same export:
/// `OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT` when set, else the metrics
/// endpoint with its `/v1/metrics` path made `/v1/<signal>` (HTTP), or the
/// same address (gRPC).
pub fn signal_endpoint(metrics: &OtlpSettings, signal: &str, env: Env<'_>) -> Result<String, String> {
    if let Some(e) = env(&format!("OTEL_EXPORTER_OTLP_{}_ENDPOINT", signal.to_ascii_uppercase()))? {
        return Ok(e.trim().to_string());
    }
    Ok(match metrics.protocol {
        OtlpProtocol::Grpc => metrics.endpoint.clone(),
        OtlpProtocol::HttpProtobuf => match metrics.endpoint.strip_suffix("/v1/metrics") {
            Some(base) => format!("{base}/v1/{signal}"),
            None => format!("{}/v1/{signal}", metrics.endpoint.trim_end_matches('/')),
        },
    })
}

/// The resource every export (and /metrics' target_info) carries:
/// OTEL_RESOURCE_ATTRIBUTES, service.name from OTEL_SERVICE_NAME over it
/// (else nodescope), service.version, host.name, and the Kubernetes names
/// the downward API puts in NODE_NAME, POD_NAME and POD_NAMESPACE (unless the
/// attributes already name them).
pub fn resource_attributes(env: Env<'_>) -> Result<Vec<KeyValue>, String> {
    let mut attrs: BTreeMap<String, String> = BTreeMap::new();
    if let Some(list) = env("OTEL_RESOURCE_ATTRIBUTES")? {
        attrs.extend(key_values("OTEL_RESOURCE_ATTRIBUTES", &list)?);
    }
    if let Some(name) = env("OTEL_SERVICE_NAME")? {
        attrs.insert("service.name".into(), name);
    }
    attrs.entry("service.name".into()).or_insert_with(|| "nodescope".into());
    attrs.insert("service.version".into(), env!("CARGO_PKG_VERSION").into());
    if !attrs.contains_key("host.name") {
        if let Some(host) = hostname() {
            attrs.insert("host.name".into(), host);
        }
    }
    for (var, key) in
        [("NODE_NAME", "k8s.node.name"), ("POD_NAME", "k8s.pod.name"), ("POD_NAMESPACE", "k8s.namespace.name")]
    {
        if !attrs.contains_key(key) {
            if let Some(v) = env(var)? {
                attrs.insert(key.into(), v);
            }
        }
    }
    Ok(attrs.into_iter().map(|(k, v)| KeyValue::new(k, v)).collect())
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    if unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) } != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    std::str::from_utf8(&buf[..end]).ok().filter(|s| !s.is_empty()).map(str::to_string)
}

/// Export outcomes, exported as nodescope_otlp_exports_total{result}.
#[derive(Default)]
pub struct ExportCounts {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
}

/// The OTLP exporter, counting each export's outcome and logging failures
/// at most once per LOG_EVERY (with the number held back). The periodic
/// reader runs it on its own thread, bounded by otlp.timeout: a collector
/// that is down or slow delays neither collection nor /metrics, and the
/// next export goes out at its time whatever became of this one.
pub struct CountedExporter<E> {
    inner: E,
    target: String,
    counts: Arc<ExportCounts>,
    log: Mutex<(Option<Instant>, u64)>,
    /// an export of this exporter (this endpoint) went through
    delivered: AtomicBool,
}

const LOG_EVERY: Duration = Duration::from_secs(30);

impl<E> CountedExporter<E> {
    pub fn new(inner: E, target: String, counts: Arc<ExportCounts>) -> Self {
        CountedExporter { inner, target, counts, log: Mutex::new((None, 0)), delivered: AtomicBool::new(false) }
    }

    fn note(&self, r: &OTelSdkResult) {
        match r {
            Ok(()) => {
                self.counts.ok.fetch_add(1, Ordering::Relaxed);
                let first = !self.delivered.swap(true, Ordering::Relaxed);
                let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
                if log.0.is_some() && log.1 > 0 {
                    tracing::info!("OTLP export to {} works again ({} failed before)", self.target, log.1);
                    log.1 = 0;
                } else if first {
                    tracing::info!("OTLP export to {}: first export delivered", self.target);
                }
            }
            Err(e) => {
                self.counts.failed.fetch_add(1, Ordering::Relaxed);
                let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
                log.1 += 1;
                let now = Instant::now();
                if log.0.is_none_or(|t| now.duration_since(t) >= LOG_EVERY) {
                    log.0 = Some(now);
                    tracing::warn!(
                        "OTLP export to {} failed ({} failed in a row; logged at most every {:?}): {e}",
                        self.target,
                        log.1,
                        LOG_EVERY
                    );
                }
            }
        }
    }
}

impl<E: PushMetricExporter> PushMetricExporter for CountedExporter<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let r = self.inner.export(metrics).await;
        self.note(&r);
        r
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

/// The metric exporter the OTLP reader runs, whatever the protocol.
pub type MetricExport = CountedExporter<opentelemetry_otlp::MetricExporter>;

/// What the OTLP reader's thread is told.
enum Command {
    /// Export to this exporter every interval from now on (None: export no
    /// more); the exporter it had is shut down once this one is in place.
    Set(Option<(Box<MetricExport>, Duration)>),
    /// A last export, then the exporter shut down; acknowledged.
    Shutdown(mpsc::Sender<()>),
}

/// The meter provider's OTLP reader: registered once at start, so the
/// instruments and their cumulative values are the same whatever becomes of
/// the export, and driven by a thread of its own that collects and exports
/// every interval to the exporter set last (`set`): none, the one the agent
/// started with, or one a reload built. A slow or absent collector delays
/// neither collection nor /metrics.
#[derive(Clone)]
pub struct OtlpReader {
    manual: Arc<ManualReader>,
    commands: mpsc::Sender<Command>,
}

impl std::fmt::Debug for OtlpReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OtlpReader")
    }
}

impl OtlpReader {
    /// The reader, exporting nothing until `set`.
    pub fn new() -> std::io::Result<OtlpReader> {
        let manual = Arc::new(ManualReader::builder().build());
        let (commands, rx) = mpsc::channel();
        let m = manual.clone();
        std::thread::Builder::new().name("nodescope-otlp".into()).spawn(move || run_reader(&m, rx))?;
        Ok(OtlpReader { manual, commands })
    }

    /// Exports go to `export` from now on, the first one an interval later.
    pub fn set(&self, export: Option<(MetricExport, Duration)>) {
        let _ = self.commands.send(Command::Set(export.map(|(e, i)| (Box::new(e), i))));
    }
}

fn run_reader(manual: &ManualReader, commands: mpsc::Receiver<Command>) {
    // what the exporters log about themselves is not exported again
    let _suppressed = opentelemetry::Context::enter_telemetry_suppressed_scope();
    let mut current: Option<(Box<MetricExport>, Duration)> = None;
    let mut due = Instant::now();
    let mut rm = ResourceMetrics::default();
    loop {
        let command = match &current {
            None => commands.recv().ok(),
            Some((exporter, interval)) => match commands.recv_timeout(due.saturating_duration_since(Instant::now())) {
                Ok(c) => Some(c),
                Err(mpsc::RecvTimeoutError::Disconnected) => None,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    collect_and_export(manual, exporter, &mut rm);
                    // the next one at its time, or an interval from now when
                    // this one took longer than an interval
                    due += *interval;
                    let now = Instant::now();
                    if due <= now {
                        due = now + *interval;
                    }
                    continue;
                }
            },
        };
        match command {
            Some(Command::Set(new)) => {
                let old = std::mem::replace(&mut current, new);
                if let Some((_, interval)) = &current {
                    due = Instant::now() + *interval;
                }
                if let Some((old, _)) = old {
                    let _ = old.shutdown_with_timeout(Duration::from_secs(5));
                }
            }
            Some(Command::Shutdown(done)) => {
                if let Some((exporter, _)) = current.take() {
                    collect_and_export(manual, &exporter, &mut rm);
                    let _ = exporter.shutdown_with_timeout(Duration::from_secs(5));
                }
                let _ = done.send(());
                return;
            }
            None => return,
        }
    }
}

fn collect_and_export(manual: &ManualReader, exporter: &MetricExport, rm: &mut ResourceMetrics) {
    use opentelemetry_sdk::metrics::reader::MetricReader;
    if let Err(e) = manual.collect(rm) {
        tracing::warn!("OTLP: collecting the metrics to export: {e}");
        return;
    }
    // the outcome is counted and logged by the exporter
    let _ = block_on(exporter.export(rm));
}

/// Runs `f` to completion on this thread (the HTTP exporter's blocking
/// client must not run inside a tokio runtime; the gRPC channel's own task
/// runs on the agent's runtime).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

impl opentelemetry_sdk::metrics::reader::MetricReader for OtlpReader {
    fn register_pipeline(&self, pipeline: std::sync::Weak<opentelemetry_sdk::metrics::Pipeline>) {
        self.manual.register_pipeline(pipeline)
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.manual.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let (done, wait) = mpsc::channel();
        if self.commands.send(Command::Shutdown(done)).is_ok() {
            let _ = wait.recv_timeout(timeout);
        }
        self.manual.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, _kind: opentelemetry_sdk::metrics::InstrumentKind) -> Temporality {
        Temporality::Cumulative
    }
}

/// The processor the tracer or logger provider was built with, forwarding to
/// a batch processor (the export to a collector) that a reload replaces;
/// with none, records are dropped. The providers, and the tracing layers
/// over them, stay.
#[derive(Debug)]
pub struct Switch<P> {
    inner: Arc<SwitchInner<P>>,
}

#[derive(Debug)]
struct SwitchInner<P> {
    current: RwLock<Option<Arc<P>>>,
    on: AtomicBool,
    resource: Mutex<Option<Resource>>,
}

impl<P> Clone for Switch<P> {
    fn clone(&self) -> Self {
        Switch { inner: self.inner.clone() }
    }
}

impl<P> Default for Switch<P> {
    fn default() -> Self {
        Switch {
            inner: Arc::new(SwitchInner {
                current: RwLock::new(None),
                on: AtomicBool::new(false),
                resource: Mutex::new(None),
            }),
        }
    }
}

/// A processor the switch can hold: given the provider's resource before
/// it is installed.
pub trait Switchable: Send + Sync {
    fn resource(&mut self, resource: &Resource);
    fn stop(&self) -> OTelSdkResult;
}

impl Switchable for opentelemetry_sdk::trace::BatchSpanProcessor {
    fn resource(&mut self, resource: &Resource) {
        opentelemetry_sdk::trace::SpanProcessor::set_resource(self, resource)
    }
    fn stop(&self) -> OTelSdkResult {
        opentelemetry_sdk::trace::SpanProcessor::shutdown_with_timeout(self, Duration::from_secs(5))
    }
}

impl Switchable for opentelemetry_sdk::logs::BatchLogProcessor {
    fn resource(&mut self, resource: &Resource) {
        opentelemetry_sdk::logs::LogProcessor::set_resource(self, resource)
    }
    fn stop(&self) -> OTelSdkResult {
        opentelemetry_sdk::logs::LogProcessor::shutdown_with_timeout(self, Duration::from_secs(5))
    }
}

impl<P: Switchable> Switch<P> {
    /// Records go to `new` from now on; the processor before is returned,
    /// for the caller to shut down (it flushes what it holds).
    pub fn replace(&self, new: Option<P>) -> Option<Arc<P>> {
        let new = new.map(|mut p| {
            if let Some(r) = self.inner.resource.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                p.resource(r);
            }
            Arc::new(p)
        });
        self.inner.on.store(new.is_some(), Ordering::Relaxed);
        std::mem::replace(&mut *self.inner.current.write().unwrap_or_else(|e| e.into_inner()), new)
    }

    /// Something to export to.
    pub fn is_on(&self) -> bool {
        self.inner.on.load(Ordering::Relaxed)
    }

    fn current(&self) -> Option<Arc<P>> {
        self.inner.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn flush(&self, f: impl FnOnce(&P) -> OTelSdkResult) -> OTelSdkResult {
        self.current().map_or(Ok(()), |p| f(&p))
    }

    fn set_provider_resource(&self, resource: &Resource) {
        *self.inner.resource.lock().unwrap_or_else(|e| e.into_inner()) = Some(resource.clone());
    }

    fn stop(&self) -> OTelSdkResult {
        self.replace(None).map_or(Ok(()), |p| p.stop())
    }
}

impl opentelemetry_sdk::trace::SpanProcessor for Switch<opentelemetry_sdk::trace::BatchSpanProcessor> {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        if let Some(p) = self.current() {
            p.on_start(span, cx);
        }
    }
    fn on_end(&self, span: opentelemetry_sdk::trace::SpanData) {
        if let Some(p) = self.current() {
            p.on_end(span);
        }
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.flush(|p| p.force_flush())
    }
    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        self.stop()
    }
    fn set_resource(&mut self, resource: &Resource) {
        self.set_provider_resource(resource);
    }
}

impl opentelemetry_sdk::logs::LogProcessor for Switch<opentelemetry_sdk::logs::BatchLogProcessor> {
    fn emit(
        &self,
        data: &mut opentelemetry_sdk::logs::SdkLogRecord,
        instrumentation: &opentelemetry::InstrumentationScope,
    ) {
        if let Some(p) = self.current() {
            p.emit(data, instrumentation);
        }
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.flush(|p| p.force_flush())
    }
    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        self.stop()
    }
    fn event_enabled(&self, _level: opentelemetry::logs::Severity, _target: &str, _name: Option<&str>) -> bool {
        self.is_on()
    }
    fn set_resource(&mut self, resource: &Resource) {
        self.set_provider_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Result<Option<String>, String> {
        let vars: BTreeMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| Ok(vars.get(name).cloned())
    }

    #[test]
    fn environment_over_toml_specific_over_general() {
        let toml = OtlpConfig { endpoint: Some("http://toml:4318/v1/metrics".into()), ..OtlpConfig::default() };
        let r = |vars: &[(&str, &str)]| resolve(&toml, &env_of(vars)).unwrap().unwrap();
        assert_eq!(r(&[]).endpoint, "http://toml:4318/v1/metrics");
        assert_eq!(r(&[]).protocol, OtlpProtocol::HttpProtobuf);
        // the general endpoint is a base for http/protobuf
        assert_eq!(r(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318/")]).endpoint, "http://env:4318/v1/metrics");
        let grpc = r(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4317"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]);
        assert_eq!((grpc.endpoint.as_str(), grpc.protocol), ("http://env:4317", OtlpProtocol::Grpc));
        let specific = r(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4318"),
            ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://specific:9/m"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf"),
        ]);
        assert_eq!(
            (specific.endpoint.as_str(), specific.protocol),
            ("http://specific:9/m", OtlpProtocol::HttpProtobuf)
        );
        let h = r(&[
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=a%20b,tenant=t1"),
            ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "tenant=t2"),
        ]);
        assert_eq!(h.headers.get("api-key").map(String::as_str), Some("a b"));
        assert_eq!(h.headers.get("tenant").map(String::as_str), Some("t2"));
        // nothing set anywhere: no export
        assert_eq!(resolve(&OtlpConfig::default(), &env_of(&[])).unwrap(), None);
        // errors name the variable
        let bad = resolve(&toml, &env_of(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")])).unwrap_err();
        assert!(bad.starts_with("OTEL_EXPORTER_OTLP_PROTOCOL:"), "{bad}");
        let bad = resolve(&toml, &env_of(&[("OTEL_EXPORTER_OTLP_HEADERS", "novalue")])).unwrap_err();
        assert!(bad.starts_with("OTEL_EXPORTER_OTLP_HEADERS:"), "{bad}");
        let http = r(&[]);
        assert_eq!(signal_endpoint(&http, "traces", &env_of(&[])).unwrap(), "http://toml:4318/v1/traces");
        let logs = signal_endpoint(&http, "logs", &env_of(&[("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "http://l:1/x")]));
        assert_eq!(logs.unwrap(), "http://l:1/x");
        assert_eq!(signal_endpoint(&grpc, "logs", &env_of(&[])).unwrap(), "http://env:4317");
        let bad = resolve(&toml, &env_of(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://x")])).unwrap_err();
        assert!(bad.contains("http://"), "{bad}");
    }

    /// Span names an exporter received.
    #[derive(Debug, Clone, Default)]
    struct Names(Arc<Mutex<Vec<String>>>);

    impl opentelemetry_sdk::trace::SpanExporter for Names {
        async fn export(&self, batch: Vec<opentelemetry_sdk::trace::SpanData>) -> OTelSdkResult {
            self.0.lock().unwrap().extend(batch.into_iter().map(|s| s.name.to_string()));
            Ok(())
        }
    }

    impl Names {
        fn get(&self) -> Vec<String> {
            self.0.lock().unwrap().clone()
        }
    }

    #[test]
    fn spans_go_where_the_switch_points_last() {
        use opentelemetry::trace::{Tracer, TracerProvider};
        use opentelemetry_sdk::trace::BatchSpanProcessor;
        let switch = Switch::<BatchSpanProcessor>::default();
        let provider =
            opentelemetry_sdk::trace::SdkTracerProvider::builder().with_span_processor(switch.clone()).build();
        let tracer = provider.tracer("t");
        tracer.in_span("nowhere", |_| {});
        assert!(!switch.is_on());
        let (a, b) = (Names::default(), Names::default());
        assert!(switch.replace(Some(BatchSpanProcessor::builder(a.clone()).build())).is_none());
        assert!(switch.is_on());
        tracer.in_span("to-a", |_| {});
        let old = switch.replace(Some(BatchSpanProcessor::builder(b.clone()).build())).unwrap();
        tracer.in_span("to-b", |_| {});
        // the processor replaced sends what it held as it stops
        old.stop().unwrap();
        assert_eq!(a.get(), ["to-a"]);
        opentelemetry_sdk::trace::SpanProcessor::force_flush(&switch).unwrap();
        assert_eq!(b.get(), ["to-b"]);
        let old = switch.replace(None).unwrap();
        old.stop().unwrap();
        tracer.in_span("off", |_| {});
        provider.shutdown().unwrap();
        assert_eq!((a.get(), b.get()), (vec!["to-a".to_string()], vec!["to-b".to_string()]));
    }

    #[test]
    fn resource_from_the_environment() {
        let attrs = |vars: &[(&str, &str)]| -> BTreeMap<String, String> {
            resource_attributes(&env_of(vars))
                .unwrap()
                .into_iter()
                .map(|kv| (kv.key.to_string(), kv.value.to_string()))
                .collect()
        };
        let a = attrs(&[]);
        assert_eq!(a["service.name"], "nodescope");
        assert_eq!(a["service.version"], env!("CARGO_PKG_VERSION"));
        assert!(a.contains_key("host.name"));
        let a = attrs(&[
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs,deployment.environment=prod%2Ceu,k8s.pod.name=p1"),
            ("NODE_NAME", "n1"),
            ("POD_NAME", "ignored"),
        ]);
        assert_eq!(a["service.name"], "from-attrs");
        assert_eq!(a["deployment.environment"], "prod,eu");
        assert_eq!(a["k8s.node.name"], "n1");
        assert_eq!(a["k8s.pod.name"], "p1");
        let a = attrs(&[("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs"), ("OTEL_SERVICE_NAME", "svc")]);
        assert_eq!(a["service.name"], "svc");
    }
}

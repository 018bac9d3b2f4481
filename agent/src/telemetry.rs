//! The one OpenTelemetry pipeline: a meter provider whose readers are the
//! Prometheus registry behind /metrics and the OTLP reader. Signals register
//! their own instruments on the meter it hands out. The OTLP export (metrics,
//! and the agent's own spans and logs) is built from `[otlp]` and the
//! standard environment at start, and rebuilt on SIGHUP when they resolve to
//! other settings; the providers, instruments and tracing layers stay.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Instant;

use hyper::body::Bytes;
use opentelemetry::metrics::{Meter, MeterProvider};
use opentelemetry_sdk::logs::BatchLogProcessor;
use opentelemetry_sdk::metrics::{Instrument, SdkMeterProvider, Stream};
use opentelemetry_sdk::trace::BatchSpanProcessor;
use opentelemetry_sdk::Resource;
use prometheus::proto::{MetricFamily, MetricType};
use prometheus::{Encoder, TextEncoder};

use crate::config::{Config, OtlpProtocol};
use crate::otlp::{MetricExport, OtlpSettings, Switch};

/// The agent's own spans and logs over OTLP: the providers the tracing
/// layers write to, built once, each with a switch that the start and each
/// reload point at a collector (or at none).
struct OtelLogging {
    tracer: opentelemetry_sdk::trace::SdkTracerProvider,
    logger: opentelemetry_sdk::logs::SdkLoggerProvider,
    spans: Switch<BatchSpanProcessor>,
    logs: Switch<BatchLogProcessor>,
    /// drives the span and log exporters' gRPC channels (the batch
    /// processors export on threads of their own); made at the first need
    runtime: OnceLock<tokio::runtime::Runtime>,
}

static OTEL_LOGGING: OnceLock<OtelLogging> = OnceLock::new();

/// The span and log exporters of one `[otlp]` setting, not running yet.
type LoggingExporters = (opentelemetry_otlp::SpanExporter, opentelemetry_otlp::LogExporter);

/// Logging to stderr (text or `[log] format = "json"`, colour only on a
/// terminal) and, when OTLP is configured, the agent's spans (collection
/// cycles, scope changes, health evaluations) and log records to the same
/// collector through `tracing-opentelemetry` and the log bridge. Events of
/// the export machinery itself never go to OTLP (no feedback loop).
pub fn init_logging(config: &Config) {
    use opentelemetry::trace::TracerProvider;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    // RUST_LOG when it parses; tracing-subscriber 0.3's directive parser
    // panics on some non-ASCII text (config.rs checks log.level the same way)
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if v.is_ascii() => tracing_subscriber::EnvFilter::try_new(v).ok(),
        Ok(_) => {
            eprintln!("nodescope: RUST_LOG ignored: ASCII only; log.level applies");
            None
        }
        Err(_) => None,
    }
    .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(&config.log.level));
    use std::io::IsTerminal;
    // colour codes only on a terminal: journald and log files get plain text
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let fmt: Box<dyn Layer<_> + Send + Sync> = match config.log.format {
        crate::config::LogFormat::Json => fmt.json().boxed(),
        crate::config::LogFormat::Text => fmt.boxed(),
    };
    let env = crate::otlp::process_env;
    let mut problem = None;
    let attributes = crate::otlp::resource_attributes(&env).unwrap_or_else(|e| {
        problem = Some(e);
        Vec::new()
    });
    let resource = Resource::builder_empty()
        .with_detector(Box::new(opentelemetry_sdk::resource::TelemetryResourceDetector))
        .with_attributes(attributes)
        .build();
    let (spans, logs) = (Switch::default(), Switch::default());
    let otel = OtelLogging {
        tracer: opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_resource(resource.clone())
            .with_span_processor(spans.clone())
            .build(),
        logger: opentelemetry_sdk::logs::SdkLoggerProvider::builder()
            .with_resource(resource)
            .with_log_processor(logs.clone())
            .build(),
        spans,
        logs,
        runtime: OnceLock::new(),
    };
    // what goes to OTLP: not the export machinery's own events, and nothing
    // while no collector is set (asked at each span and event: a reload
    // turns it on and off)
    fn exported(m: &tracing::Metadata<'_>) -> bool {
        let t = m.target();
        !["opentelemetry", "tonic", "h2", "hyper", "reqwest", "tower", "nodescope::otlp"]
            .iter()
            .any(|p| t.starts_with(p))
    }
    let on = otel.spans.clone();
    let spans = tracing_opentelemetry::layer()
        .with_tracer(otel.tracer.tracer("nodescope"))
        .with_filter(tracing_subscriber::filter::dynamic_filter_fn(move |m, _| on.is_on() && exported(m)));
    let on = otel.logs.clone();
    let logs = opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge::new(&otel.logger)
        .with_filter(tracing_subscriber::filter::dynamic_filter_fn(move |m, _| on.is_on() && exported(m)));
    tracing_subscriber::registry().with(filter).with(fmt).with(spans).with(logs).init();
    let otel = OTEL_LOGGING.get_or_init(|| otel);
    if problem.is_none() {
        match crate::otlp::resolve(&config.otlp, &env).and_then(|s| s.map(|s| logging_exporters(otel, &s)).transpose())
        {
            Ok(exporters) => switch_logging(otel, exporters),
            Err(e) => problem = Some(e),
        }
    }
    if let Some(e) = problem {
        tracing::warn!("spans and logs not exported over OTLP: {e}");
    }
}

/// Flushes and stops the span and log export.
pub fn shutdown_logging() {
    if let Some(o) = OTEL_LOGGING.get() {
        let _ = o.tracer.shutdown();
        let _ = o.logger.shutdown();
    }
}

/// Spans and logs go to `exporters` from now on (None: nowhere); the batch
/// processors before flush what they hold to their collector and stop, on a
/// thread of their own.
fn switch_logging(otel: &OtelLogging, exporters: Option<LoggingExporters>) {
    let (spans, logs) = match exporters {
        Some((s, l)) => (Some(BatchSpanProcessor::builder(s).build()), Some(BatchLogProcessor::builder(l).build())),
        None => (None, None),
    };
    let old_spans = otel.spans.replace(spans);
    let old_logs = otel.logs.replace(logs);
    if old_spans.is_some() || old_logs.is_some() {
        let stop = move || {
            use crate::otlp::Switchable;
            if let Some(p) = old_spans {
                let _ = p.stop();
            }
            if let Some(p) = old_logs {
                let _ = p.stop();
            }
        };
        if let Err(e) = std::thread::Builder::new().name("nodescope-otlp-stop".into()).spawn(stop) {
            tracing::warn!("stopping the span and log export before the reload: {e}");
        }
    }
}

/// gRPC metadata of `headers` (keys lower-cased, as HTTP/2 has them).
fn grpc_metadata(headers: &std::collections::BTreeMap<String, String>) -> Result<tonic::metadata::MetadataMap, String> {
    let mut m = tonic::metadata::MetadataMap::new();
    for (k, v) in headers {
        let key = tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
            .map_err(|e| format!("header {k:?}: {e}"))?;
        m.insert(key, v.parse().map_err(|e| format!("header {k:?}: {e}"))?);
    }
    Ok(m)
}

/// The span and log exporters for `otlp`: the same protocol and headers,
/// to `/v1/traces` and `/v1/logs` beside the metrics path for HTTP (or the
/// signal's own OTEL_EXPORTER_OTLP_*_ENDPOINT).
fn logging_exporters(otel: &OtelLogging, otlp: &OtlpSettings) -> Result<LoggingExporters, String> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
    let env = crate::otlp::process_env;
    let traces = crate::otlp::signal_endpoint(otlp, "traces", &env)?;
    let logs = crate::otlp::signal_endpoint(otlp, "logs", &env)?;
    let err = |e: opentelemetry_otlp::ExporterBuildError| e.to_string();
    match otlp.protocol {
        OtlpProtocol::HttpProtobuf => {
            let headers: HashMap<String, String> = otlp.headers.clone().into_iter().collect();
            Ok((
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_endpoint(traces)
                    .with_timeout(otlp.timeout)
                    .with_headers(headers.clone())
                    .build()
                    .map_err(err)?,
                opentelemetry_otlp::LogExporter::builder()
                    .with_http()
                    .with_endpoint(logs)
                    .with_timeout(otlp.timeout)
                    .with_headers(headers)
                    .build()
                    .map_err(err)?,
            ))
        }
        OtlpProtocol::Grpc => {
            if otel.runtime.get().is_none() {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("nodescope-otlp")
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                let _ = otel.runtime.set(runtime);
            }
            let runtime = otel.runtime.get().ok_or("no runtime for the gRPC channels")?;
            // the channels' connection tasks live on the runtime
            let _entered = runtime.enter();
            Ok((
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(traces)
                    .with_timeout(otlp.timeout)
                    .with_metadata(grpc_metadata(&otlp.headers)?)
                    .build()
                    .map_err(err)?,
                opentelemetry_otlp::LogExporter::builder()
                    .with_tonic()
                    .with_endpoint(logs)
                    .with_timeout(otlp.timeout)
                    .with_metadata(grpc_metadata(&otlp.headers)?)
                    .build()
                    .map_err(err)?,
            ))
        }
    }
}

/// The metric exporter for `otlp`: HTTP/protobuf through the blocking
/// client, or gRPC over a channel that `runtime` drives; counting outcomes
/// into `counts`.
fn metric_exporter(
    otlp: &OtlpSettings,
    counts: Arc<crate::otlp::ExportCounts>,
    runtime: &tokio::runtime::Handle,
) -> Result<MetricExport, String> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
    let err = |e: opentelemetry_otlp::ExporterBuildError| format!("{}: {e}", otlp.endpoint);
    let exporter = match otlp.protocol {
        OtlpProtocol::HttpProtobuf => opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_endpoint(otlp.endpoint.clone())
            .with_timeout(otlp.timeout)
            .with_headers(otlp.headers.clone().into_iter().collect())
            .build()
            .map_err(err)?,
        OtlpProtocol::Grpc => {
            let metadata = grpc_metadata(&otlp.headers)?;
            // the channel's connection task lives on the runtime
            let _entered = runtime.enter();
            opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(otlp.endpoint.clone())
                .with_timeout(otlp.timeout)
                .with_metadata(metadata)
                .build()
                .map_err(err)?
        }
    };
    Ok(crate::otlp::CountedExporter::new(exporter, otlp.endpoint.clone(), counts))
}

/// The exporters of another `[otlp]` setting, built and not running yet
/// (`Telemetry::prepare_otlp`, then `apply_otlp`).
pub struct OtlpChange {
    settings: Option<OtlpSettings>,
    metrics: Option<MetricExport>,
    logging: Option<LoggingExporters>,
}

impl OtlpChange {
    /// What the export becomes, for the reload's log line.
    pub fn describe(&self) -> String {
        match &self.settings {
            None => "OTLP export off".into(),
            Some(s) => format!(
                "OTLP export ({}) to {} every {:?}{}",
                s.protocol.as_str(),
                s.endpoint,
                s.interval,
                if s.headers.is_empty() {
                    String::new()
                } else {
                    format!(" with headers {:?}", s.headers.keys().collect::<Vec<_>>())
                }
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("prometheus exporter: {0}")]
    Prometheus(String),
    #[error("otlp: {0}")]
    Otlp(String),
    #[error("encoding /metrics: {0}")]
    Exposition(String),
}

pub struct Telemetry {
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
    /// The exposition of the last collection, served to every scrape until
    /// the next one.
    exposition: RwLock<Option<Arc<Exposition>>>,
    /// When each variant was last asked for (ms since `epoch` + 1; 0: never):
    /// the variants asked for within `PREPARE_ASKED_WITHIN` are encoded at
    /// collection time, so a scrape only copies a buffer.
    asked: [AtomicU64; Variant::COUNT],
    epoch: Instant,
    /// The meter provider's OTLP reader, exporting where the settings say.
    otlp: crate::otlp::OtlpReader,
    /// The `[otlp]` settings (environment over the TOML) now exported to.
    otlp_settings: Mutex<Option<OtlpSettings>>,
    export_counts: Arc<crate::otlp::ExportCounts>,
    /// Set once OTLP has been on: nodescope_otlp_exports_total is shown from then.
    otlp_seen: Arc<AtomicBool>,
    /// Drives the gRPC metric exporter's channel.
    runtime: tokio::runtime::Handle,
}

/// The /metrics formats: the Prometheus text format (0.0.4) and OpenMetrics
/// 1.0, each plain or gzip-compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    pub format: Format,
    pub gzip: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => prometheus::TEXT_FORMAT,
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::OpenMetrics => "openmetrics",
        }
    }
}

pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl Variant {
    const COUNT: usize = 4;
    const ALL: [Variant; Variant::COUNT] = [
        Variant { format: Format::Text, gzip: false },
        Variant { format: Format::Text, gzip: true },
        Variant { format: Format::OpenMetrics, gzip: false },
        Variant { format: Format::OpenMetrics, gzip: true },
    ];
    fn index(self) -> usize {
        (self.format == Format::OpenMetrics) as usize * 2 + self.gzip as usize
    }
}

/// A variant asked for within this long is encoded at each collection.
const PREPARE_ASKED_WITHIN: std::time::Duration = std::time::Duration::from_secs(120);

/// What one collection gathered, and its encodings, each made at most once.
pub struct Exposition {
    families: Vec<MetricFamily>,
    bodies: [OnceLock<Result<Bytes, String>>; Variant::COUNT],
}

impl Exposition {
    fn new(families: Vec<MetricFamily>) -> Exposition {
        Exposition { families, bodies: Default::default() }
    }

    /// The body of `variant`, encoded on first use.
    pub fn body(&self, variant: Variant) -> Result<Bytes, String> {
        self.bodies[variant.index()]
            .get_or_init(|| {
                let plain = match variant.format {
                    Format::Text => {
                        let mut out = Vec::new();
                        TextEncoder::new().encode(&self.families, &mut out).map_err(|e| e.to_string())?;
                        out
                    }
                    Format::OpenMetrics => encode_openmetrics(&self.families),
                };
                if !variant.gzip {
                    return Ok(Bytes::from(plain));
                }
                use std::io::Write;
                let mut gz =
                    flate2::write::GzEncoder::new(Vec::with_capacity(plain.len() / 8), flate2::Compression::fast());
                gz.write_all(&plain).map_err(|e| e.to_string())?;
                gz.finish().map(Bytes::from).map_err(|e| e.to_string())
            })
            .clone()
    }
}

impl Telemetry {
    /// `runtime` drives the gRPC exporter's connection (the OTLP reader
    /// runs exports on a thread of its own).
    pub fn new(config: &Config, runtime: &tokio::runtime::Handle) -> Result<Telemetry, TelemetryError> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .scope_info_enabled(false)
            .build()
            .map_err(|e| TelemetryError::Prometheus(e.to_string()))?;
        // Per-peer instruments may carry (top_peers + "other") x directions
        // series per target: let them, the SDK default of 2000 would fold
        // real peers into its overflow series.
        let per_peer_limit = (config.limits.top_peers + 1) * 4 * crate::bpf::abi::MAX_TARGETS;
        let env = crate::otlp::process_env;
        let otlp = crate::otlp::resolve(&config.otlp, &env).map_err(TelemetryError::Otlp)?;
        let export_counts = Arc::new(crate::otlp::ExportCounts::default());
        let metrics = otlp
            .as_ref()
            .map(|o| metric_exporter(o, export_counts.clone(), runtime))
            .transpose()
            .map_err(TelemetryError::Otlp)?;
        // registered whether OTLP is set or not, so a reload can set it
        let reader = crate::otlp::OtlpReader::new()
            .map_err(|e| TelemetryError::Otlp(format!("starting the export thread: {e}")))?;
        let attributes = crate::otlp::resource_attributes(&env).map_err(TelemetryError::Otlp)?;
        let provider = SdkMeterProvider::builder()
            .with_reader(reader.clone())
            .with_resource(
                Resource::builder_empty()
                    .with_detector(Box::new(opentelemetry_sdk::resource::TelemetryResourceDetector))
                    .with_attributes(attributes)
                    .build(),
            )
            .with_reader(exporter)
            .with_view(move |i: &Instrument| {
                if crate::net::metrics::PER_PEER_INSTRUMENTS.contains(&i.name()) {
                    Stream::builder().with_cardinality_limit(per_peer_limit).build().ok()
                } else {
                    None
                }
            })
            .build();
        let otlp_seen = Arc::new(AtomicBool::new(false));
        let (c, seen) = (export_counts.clone(), otlp_seen.clone());
        provider
            .meter("nodescope")
            .u64_observable_counter("nodescope.otlp.exports")
            .with_description("OTLP exports by outcome (ok, failed): a failed one is logged at most every 30 s and the next goes out at its time")
            .with_callback(move |o| {
                if seen.load(Ordering::Relaxed) {
                    o.observe(c.ok.load(Ordering::Relaxed), &[opentelemetry::KeyValue::new("result", "ok")]);
                    o.observe(c.failed.load(Ordering::Relaxed), &[opentelemetry::KeyValue::new("result", "failed")]);
                }
            })
            .build();
        let telemetry = Telemetry {
            provider,
            registry,
            exposition: RwLock::new(None),
            asked: Default::default(),
            epoch: Instant::now(),
            otlp: reader,
            otlp_settings: Mutex::new(None),
            export_counts,
            otlp_seen,
            runtime: runtime.clone(),
        };
        if let Some(settings) = otlp {
            telemetry.apply_otlp(OtlpChange { settings: Some(settings), metrics, logging: None }, false);
        }
        Ok(telemetry)
    }

    /// The exporters for `config`'s `[otlp]` (the standard environment over
    /// it, as at start), built but not running; None when that resolves to
    /// the settings exported to now (nothing is rebuilt). An error (a value
    /// the environment or an exporter refuses) leaves the running export as
    /// it is.
    pub fn prepare_otlp(&self, config: &Config) -> Result<Option<OtlpChange>, String> {
        let settings =
            crate::otlp::resolve(&config.otlp, &crate::otlp::process_env).map_err(|e| format!("otlp: {e}"))?;
        if *self.otlp_settings.lock().unwrap_or_else(|e| e.into_inner()) == settings {
            return Ok(None);
        }
        let Some(s) = &settings else { return Ok(Some(OtlpChange { settings, metrics: None, logging: None })) };
        let metrics =
            metric_exporter(s, self.export_counts.clone(), &self.runtime).map_err(|e| format!("otlp: {e}"))?;
        let logging = match OTEL_LOGGING.get() {
            Some(otel) => Some(logging_exporters(otel, s).map_err(|e| format!("otlp (spans and logs): {e}"))?),
            None => None,
        };
        Ok(Some(OtlpChange { settings, metrics: Some(metrics), logging }))
    }

    /// Exports (metrics, and spans and logs with `logging`) go where
    /// `change` says from now on; the exporters before are shut down once
    /// the new ones are in place. Instruments and their values stay.
    pub fn apply_otlp(&self, change: OtlpChange, logging: bool) {
        let OtlpChange { settings, metrics, logging: exporters } = change;
        match (&settings, metrics) {
            (Some(s), Some(m)) => {
                self.otlp_seen.store(true, Ordering::Relaxed);
                tracing::info!(
                    "exporting metrics over OTLP ({}) to {} every {:?}",
                    s.protocol.as_str(),
                    s.endpoint,
                    s.interval
                );
                self.otlp.set(Some((m, s.interval)));
            }
            _ => self.otlp.set(None),
        }
        if logging {
            if let Some(otel) = OTEL_LOGGING.get() {
                switch_logging(otel, exporters);
            }
        }
        *self.otlp_settings.lock().unwrap_or_else(|e| e.into_inner()) = settings;
    }

    pub fn meter(&self) -> Meter {
        self.provider.meter("nodescope")
    }

    /// Gathers every instrument once (their callbacks read the snapshots
    /// this collection published) and encodes the variants scrapers asked
    /// for lately; scrapes until the next collection are served from it.
    pub fn refresh(&self) {
        let exposition = Arc::new(Exposition::new(self.registry.gather()));
        let now = self.epoch.elapsed().as_millis() as u64;
        for v in Variant::ALL {
            let asked = self.asked[v.index()].load(Ordering::Relaxed);
            if asked > 0 && now.saturating_sub(asked - 1) <= PREPARE_ASKED_WITHIN.as_millis() as u64 {
                if let Err(e) = exposition.body(v) {
                    tracing::warn!("encoding /metrics ({} gzip {}): {e}", v.format.as_str(), v.gzip);
                }
            }
        }
        *self.exposition.write().unwrap_or_else(|e| e.into_inner()) = Some(exposition);
    }

    /// The body of `variant` from the last collection's exposition (gathered
    /// now when there was none yet).
    pub fn exposition(&self, variant: Variant) -> Result<Bytes, TelemetryError> {
        self.asked[variant.index()].store(self.epoch.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
        let current = self.exposition.read().unwrap_or_else(|e| e.into_inner()).clone();
        let exposition = match current {
            Some(e) => e,
            None => Arc::new(Exposition::new(self.registry.gather())),
        };
        exposition.body(variant).map_err(TelemetryError::Exposition)
    }

    pub fn shutdown(&self) {
        let _ = self.provider.shutdown();
    }
}

/// OpenMetrics 1.0 text of `families` as the Prometheus exporter made them:
/// a counter's family is named without its `_total` (which its samples
/// carry), histogram bounds are canonical floats, and `# EOF` ends it.
pub fn encode_openmetrics(families: &[MetricFamily]) -> Vec<u8> {
    use std::fmt::Write;
    let mut out = String::with_capacity(64 * 1024);
    for mf in families {
        let name = mf.name();
        let (family, kind) = match mf.get_field_type() {
            MetricType::COUNTER => (name.strip_suffix("_total").unwrap_or(name), "counter"),
            MetricType::GAUGE => (name, "gauge"),
            MetricType::HISTOGRAM => (name, "histogram"),
            MetricType::SUMMARY => (name, "summary"),
            MetricType::UNTYPED => (name, "unknown"),
        };
        if !mf.help().is_empty() {
            let _ = writeln!(out, "# HELP {family} {}", escape(mf.help()));
        }
        let _ = writeln!(out, "# TYPE {family} {kind}");
        for m in mf.get_metric() {
            let labels = m.get_label();
            match mf.get_field_type() {
                MetricType::COUNTER => {
                    sample(&mut out, family, "_total", labels, None, m.get_counter().value());
                }
                MetricType::GAUGE => sample(&mut out, family, "", labels, None, m.get_gauge().value()),
                MetricType::UNTYPED => sample(&mut out, family, "", labels, None, m.untyped.value()),
                MetricType::HISTOGRAM => {
                    let h = m.get_histogram();
                    let mut inf_seen = false;
                    for b in h.get_bucket() {
                        let le = b.upper_bound();
                        inf_seen |= le == f64::INFINITY;
                        let count = b.cumulative_count() as f64;
                        sample(&mut out, family, "_bucket", labels, Some(("le", &canonical(le))), count);
                    }
                    if !inf_seen {
                        let count = h.get_sample_count() as f64;
                        sample(&mut out, family, "_bucket", labels, Some(("le", "+Inf")), count);
                    }
                    sample(&mut out, family, "_sum", labels, None, h.get_sample_sum());
                    sample(&mut out, family, "_count", labels, None, h.get_sample_count() as f64);
                }
                MetricType::SUMMARY => {
                    let s = m.get_summary();
                    for q in s.get_quantile() {
                        sample(&mut out, family, "", labels, Some(("quantile", &canonical(q.quantile()))), q.value());
                    }
                    sample(&mut out, family, "_sum", labels, None, s.sample_sum());
                    sample(&mut out, family, "_count", labels, None, s.sample_count() as f64);
                }
            }
        }
    }
    out.push_str("# EOF\n");
    out.into_bytes()
}

/// A float as OpenMetrics writes it: `1.0`, `0.005`, `+Inf`, `NaN`.
fn canonical(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v:?}")
    }
}

fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains(['\\', '"', '\n']) {
        return s.into();
    }
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n").into()
}

fn sample(
    out: &mut String,
    family: &str,
    suffix: &str,
    labels: &[prometheus::proto::LabelPair],
    extra: Option<(&str, &str)>,
    value: f64,
) {
    use std::fmt::Write;
    out.push_str(family);
    out.push_str(suffix);
    if !labels.is_empty() || extra.is_some() {
        out.push('{');
        let mut first = true;
        for (k, v) in labels.iter().map(|l| (l.name(), l.value())).chain(extra) {
            if !first {
                out.push(',');
            }
            first = false;
            let _ = write!(out, "{k}=\"{}\"", escape(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {}", canonical(value));
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::KeyValue;

    #[test]
    fn openmetrics_of_the_exporters_families() {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .scope_info_enabled(false)
            .without_target_info()
            .build()
            .unwrap();
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        let meter = provider.meter("t");
        let c = meter.u64_counter("x.sent").with_unit("By").with_description("bytes \"sent\"\nper peer").build();
        c.add(3, &[KeyValue::new("peer", "a\\b")]);
        let h = meter.f64_histogram("x.wait").with_unit("s").with_boundaries(vec![0.5, 1.0]).build();
        h.record(0.7, &[]);
        let g = meter.i64_gauge("x.open").build();
        g.record(2, &[]);
        let text = String::from_utf8(encode_openmetrics(&registry.gather())).unwrap();
        for line in [
            "# HELP x_sent_bytes bytes \\\"sent\\\"\\nper peer",
            "# TYPE x_sent_bytes counter",
            "x_sent_bytes_total{peer=\"a\\\\b\"} 3.0",
            "# TYPE x_wait_seconds histogram",
            "x_wait_seconds_bucket{le=\"0.5\"} 0.0",
            "x_wait_seconds_bucket{le=\"1.0\"} 1.0",
            "x_wait_seconds_bucket{le=\"+Inf\"} 1.0",
            "x_wait_seconds_sum 0.7",
            "x_wait_seconds_count 1.0",
            "# TYPE x_open gauge",
            "x_open 2.0",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
        }
        assert!(text.ends_with("\n# EOF\n"), "{text}");
    }

    #[test]
    fn each_variant_is_encoded_once() {
        let registry = prometheus::Registry::new();
        let g = prometheus::IntGauge::new("g", "a gauge").unwrap();
        registry.register(Box::new(g.clone())).unwrap();
        g.set(5);
        let e = Exposition::new(registry.gather());
        g.set(6);
        let plain = e.body(Variant { format: Format::Text, gzip: false }).unwrap();
        assert_eq!(std::str::from_utf8(&plain).unwrap(), "# HELP g a gauge\n# TYPE g gauge\ng 5\n");
        let gz = e.body(Variant { format: Format::Text, gzip: true }).unwrap();
        let mut unzipped = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut unzipped).unwrap();
        assert_eq!(unzipped.as_bytes(), &plain[..]);
        // the same buffer again, not a new encoding
        let again = e.body(Variant { format: Format::Text, gzip: true }).unwrap();
        assert_eq!(again.as_ptr(), gz.as_ptr());
    }
}

//! OTLP export settings as collectors and the OpenTelemetry specification
//! expect them: `[otlp]` in the config, overridden by the standard
//! environment (`OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT`, `..._PROTOCOL`,
//! `..._HEADERS`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`), the
//! exporter itself (HTTP/protobuf or gRPC), and a wrapper that counts
//! failed exports and logs them at a bounded rate.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::Temporality;

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
}

const LOG_EVERY: Duration = Duration::from_secs(30);

impl<E> CountedExporter<E> {
    pub fn new(inner: E, target: String, counts: Arc<ExportCounts>) -> Self {
        CountedExporter { inner, target, counts, log: Mutex::new((None, 0)) }
    }

    fn note(&self, r: &OTelSdkResult) {
        match r {
            Ok(()) => {
                let before = self.counts.ok.fetch_add(1, Ordering::Relaxed);
                let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
                if log.0.is_some() && log.1 > 0 {
                    tracing::info!("OTLP export to {} works again ({} failed before)", self.target, log.1);
                    log.1 = 0;
                } else if before == 0 {
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

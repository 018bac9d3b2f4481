//! The one OpenTelemetry pipeline: a meter provider whose readers are the
//! Prometheus registry behind /metrics (and, when configured, OTLP).
//! Signals register their own instruments on the meter it hands out.

use opentelemetry::metrics::{Meter, MeterProvider};
use opentelemetry_sdk::metrics::{Instrument, SdkMeterProvider, Stream};
use opentelemetry_sdk::Resource;
use prometheus::{Encoder, TextEncoder};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("prometheus exporter: {0}")]
    Prometheus(String),
    #[error("otlp.endpoint: {0}")]
    Otlp(String),
    #[error("encoding /metrics: {0}")]
    Encode(#[from] prometheus::Error),
}

pub struct Telemetry {
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
}

impl Telemetry {
    pub fn new(config: &Config) -> Result<Telemetry, TelemetryError> {
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
        let mut builder = SdkMeterProvider::builder();
        if let Some(endpoint) = &config.otlp.endpoint {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_endpoint(endpoint.clone())
                .with_timeout(config.otlp.timeout)
                .build()
                .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
            let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(exporter)
                .with_interval(config.otlp.interval)
                .build();
            builder = builder.with_reader(reader);
            tracing::info!("exporting metrics over OTLP/HTTP to {endpoint} every {:?}", config.otlp.interval);
        }
        let provider = builder
            .with_resource(
                Resource::builder()
                    .with_service_name("nodescope")
                    .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
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
        Ok(Telemetry { provider, registry })
    }

    pub fn meter(&self) -> Meter {
        self.provider.meter("nodescope")
    }

    /// The Prometheus text exposition of everything registered.
    pub fn encode(&self) -> Result<Vec<u8>, TelemetryError> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(out)
    }

    pub fn shutdown(&self) {
        let _ = self.provider.shutdown();
    }
}

//! Health verdicts as OpenTelemetry gauges, read from the published
//! `HealthSnapshot` (so /metrics and /health always agree):
//! `nodescope.health.status` per target (0 healthy, 1 degraded,
//! 2 unhealthy) and `nodescope.rule.state` per rule and target (0 ok,
//! 1 pending, 2 firing, -1 unknown). Disabled rules have no series.

use opentelemetry::metrics::Meter;
use opentelemetry::KeyValue;

use super::HealthSnapshot;
use crate::net::metrics::TARGET;
use crate::snapshot::Shared;

const RULE: &str = "nodescope.rule";
const SEVERITY: &str = "nodescope.rule.severity";

pub fn register(meter: &Meter, health: Shared<HealthSnapshot>) {
    let s = health.clone();
    meter
        .i64_observable_gauge("nodescope.health.status")
        .with_description("Health verdict per target: 0 healthy, 1 degraded (a warning rule firing), 2 unhealthy (a critical rule firing)")
        .with_callback(move |o| {
            for t in &s.get().targets {
                o.observe(t.status.gauge(), &[KeyValue::new(TARGET, t.name.clone())]);
            }
        })
        .build();

    let s = health.clone();
    meter
        .i64_observable_gauge("nodescope.rule.state")
        .with_description(
            "Health rule state per rule and target: 0 ok, 1 pending, 2 firing, -1 unknown (its signal is unavailable)",
        )
        .with_callback(move |o| {
            for t in &s.get().targets {
                for r in &t.rules {
                    o.observe(
                        r.state.gauge(),
                        &[
                            KeyValue::new(TARGET, t.name.clone()),
                            KeyValue::new(RULE, r.id),
                            KeyValue::new(SEVERITY, r.severity.as_str()),
                        ],
                    );
                }
            }
        })
        .build();

    let s = health;
    meter
        .u64_observable_counter("nodescope.health.history.dropped")
        .with_description("Rule history samples dropped because a target kept the maximum (windows then look back less far than configured)")
        .with_callback(move |o| o.observe(s.get().history_dropped, &[]))
        .build();
}

//! The HTTP request path: `http::route` on an arbitrary method and path
//! (with the health endpoint parser behind it), `http::negotiate` on
//! arbitrary Accept and Accept-Encoding values, `http::is_probe`. Input
//! lines: method, path, Accept, Accept-Encoding. Never panics, and a path
//! that names no endpoint gets a 4xx: only a real endpoint may answer 5xx
//! (a 503 verdict, a failed exposition), and a probe path is never a 404.
#![no_main]

use std::sync::{Arc, OnceLock};

use hyper::Method;
use libfuzzer_sys::fuzz_target;
use nodescope::health::endpoints;
use nodescope::http::{is_probe, negotiate, route, AppState};
use nodescope::snapshot::Shared;

fn state() -> &'static AppState {
    static STATE: OnceLock<(tokio::runtime::Runtime, AppState)> = OnceLock::new();
    &STATE
        .get_or_init(|| {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let config = nodescope::config::Config::default();
            let telemetry =
                Arc::new(nodescope::telemetry::Telemetry::new(&config, runtime.handle()).expect("telemetry"));
            let self_metrics = nodescope::selfmetrics::SelfMetrics::register(&telemetry.meter(), Shared::default());
            let state = AppState {
                telemetry,
                net: Shared::default(),
                loop_status: Shared::default(),
                health: Shared::default(),
                self_metrics,
            };
            (runtime, state)
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let method = Method::from_bytes(lines.next().unwrap_or_default().as_bytes()).unwrap_or(Method::GET);
    let path = lines.next().unwrap_or_default();
    let variant = negotiate(lines.next(), lines.next());
    let status = route(state(), &method, path, variant).status();
    let endpoint =
        path == "/metrics" || path == "/peers" || (endpoints::is_health_path(path) && endpoints::parse(path).is_ok());
    if !endpoint {
        assert!(status.is_client_error(), "{method} {path:?} answered {status}");
    }
    if is_probe(path) {
        assert_ne!(status.as_u16(), 404, "probe {path:?}");
    }
});

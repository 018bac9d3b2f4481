//! The agent's HTTP listener: /metrics, /peers (and the health endpoints).
//! Handlers only read published snapshots.

use std::convert::Infallible;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use crate::agent::LoopStatus;
use crate::config::HttpConfig;
use crate::health::{endpoints as health_endpoints, HealthSnapshot};
use crate::net::NetSnapshot;
use crate::snapshot::Shared;
use crate::telemetry::Telemetry;

pub struct AppState {
    pub telemetry: Arc<Telemetry>,
    pub net: Shared<NetSnapshot>,
    pub loop_status: Shared<LoopStatus>,
    pub health: Shared<HealthSnapshot>,
}

type Resp = Response<Full<Bytes>>;

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Resp {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("static parts are valid")
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Resp {
    respond(status, "application/json", value.to_string())
}

fn error(status: StatusCode, message: &str) -> Resp {
    json_response(status, json!({ "error": message }))
}

pub fn route(state: &AppState, method: &Method, path: &str) -> Resp {
    let health = if health_endpoints::is_health_path(path) {
        match health_endpoints::parse(path) {
            Ok(endpoint) => Some(endpoint),
            Err((status, message)) => return error(status, &message),
        }
    } else {
        None
    };
    let known = health.is_some() || matches!(path, "/metrics" | "/peers");
    if !known {
        return error(StatusCode::NOT_FOUND, "no such endpoint; see /metrics, /peers, /health");
    }
    if method != Method::GET && method != Method::HEAD {
        let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD");
        r.headers_mut().insert(ALLOW, "GET, HEAD".parse().expect("valid header"));
        return r;
    }
    if let Some(endpoint) = health {
        let now_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let (status, body) =
            health_endpoints::respond(endpoint, &state.health.get(), &state.loop_status.get(), std::time::Instant::now(), now_unix);
        return json_response(status, body);
    }
    match path {
        "/metrics" => match state.telemetry.encode() {
            Ok(body) => respond(StatusCode::OK, prometheus::TEXT_FORMAT, body),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        },
        "/peers" => json_response(StatusCode::OK, peers(&state.net.get())),
        _ => unreachable!("checked above"),
    }
}

/// Every open P2P connection of every target, not cut to the top N.
pub fn peers(net: &NetSnapshot) -> serde_json::Value {
    let targets: Vec<_> = net
        .targets
        .iter()
        .map(|t| json!({ "name": t.name, "peers": t.p2p_peers().collect::<Vec<_>>() }))
        .collect();
    json!({ "targets": targets })
}

/// The listener's bounds: connections served at once and a token bucket on
/// requests. What they turn away is counted and exported.
pub struct HttpGuard {
    connections: Arc<tokio::sync::Semaphore>,
    limiter: Option<governor::DefaultDirectRateLimiter>,
    rejected_connections: Arc<AtomicU64>,
    rejected_requests: Arc<AtomicU64>,
}

impl HttpGuard {
    pub fn new(config: &HttpConfig, meter: &opentelemetry::metrics::Meter) -> HttpGuard {
        let limiter = NonZeroU32::new(config.requests_per_second).map(|rate| {
            let burst = NonZeroU32::new(config.burst).unwrap_or(rate);
            governor::RateLimiter::direct(governor::Quota::per_second(rate).allow_burst(burst))
        });
        let guard = HttpGuard {
            connections: Arc::new(tokio::sync::Semaphore::new(config.max_connections)),
            limiter,
            rejected_connections: Arc::default(),
            rejected_requests: Arc::default(),
        };
        let (conns, reqs) = (guard.rejected_connections.clone(), guard.rejected_requests.clone());
        meter
            .u64_observable_counter("nodescope.http.rejected")
            .with_description("HTTP connections closed at http.max_connections, and requests answered 429 past http.requests_per_second")
            .with_callback(move |o| {
                o.observe(conns.load(Ordering::Relaxed), &[opentelemetry::KeyValue::new("reason", "connections")]);
                o.observe(reqs.load(Ordering::Relaxed), &[opentelemetry::KeyValue::new("reason", "rate")]);
            })
            .build();
        guard
    }

    fn admit(&self) -> Option<Resp> {
        let limiter = self.limiter.as_ref()?;
        limiter.check().err().map(|_| {
            self.rejected_requests.fetch_add(1, Ordering::Relaxed);
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, "rate limit (http.requests_per_second)");
            r.headers_mut().insert(hyper::header::RETRY_AFTER, hyper::header::HeaderValue::from_static("1"));
            r
        })
    }
}

pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    guard: Arc<HttpGuard>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let (stream, _peer): (_, SocketAddr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Ok(permit) = guard.connections.clone().try_acquire_owned() else {
            guard.rejected_connections.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let state = state.clone();
        let guard = guard.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                let guard = guard.clone();
                async move {
                    let resp = match guard.admit() {
                        Some(limited) => limited,
                        None => route(&state, req.method(), req.uri().path()),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!("http connection: {e}");
            }
            drop(permit);
        });
    }
}

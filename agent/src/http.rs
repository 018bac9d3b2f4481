//! The agent's HTTP listener: /metrics, /peers, /events (and the health endpoints).
//! Handlers only read published snapshots.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{
    HeaderMap, HeaderValue, ACCEPT, ACCEPT_ENCODING, ALLOW, CONNECTION, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER,
    VARY,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::config::HttpConfig;
use crate::health::{endpoints as health_endpoints, HealthSnapshot};
use crate::net::NetSnapshot;
use crate::snapshot::{LoopStatus, Shared};
use crate::telemetry::{Format, Telemetry, Variant};

pub struct AppState {
    pub telemetry: Arc<Telemetry>,
    pub net: Shared<NetSnapshot>,
    pub loop_status: Shared<LoopStatus>,
    pub health: Shared<HealthSnapshot>,
    pub self_metrics: crate::selfmetrics::SelfMetrics,
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

/// The /metrics variant a scraper asks for: OpenMetrics when its Accept
/// names `application/openmetrics-text` at least as high as the text format
/// (a wildcard alone gets the text format), gzip when Accept-Encoding takes it.
pub fn negotiate(accept: Option<&str>, accept_encoding: Option<&str>) -> Variant {
    // the highest q among the list's entries that `matches` (None: none does)
    fn quality(list: &str, matches: impl Fn(&str) -> bool) -> Option<f32> {
        list.split(',')
            .filter_map(|entry| {
                let mut parts = entry.split(';');
                let name = parts.next()?.trim().to_ascii_lowercase();
                if !matches(&name) {
                    return None;
                }
                let q = parts
                    .filter_map(|p| p.trim().strip_prefix("q=").or_else(|| p.trim().strip_prefix("Q=")))
                    .find_map(|q| q.trim().parse::<f32>().ok())
                    .unwrap_or(1.0);
                Some(q)
            })
            .reduce(f32::max)
    }
    let format = match accept {
        Some(accept) => {
            let om = quality(accept, |t| t == "application/openmetrics-text").unwrap_or(0.0);
            let text = quality(accept, |t| matches!(t, "text/plain" | "text/*" | "*/*")).unwrap_or(0.0);
            if om > 0.0 && om >= text {
                Format::OpenMetrics
            } else {
                Format::Text
            }
        }
        None => Format::Text,
    };
    let gzip = accept_encoding.and_then(|e| quality(e, |c| c == "gzip" || c == "*")).is_some_and(|q| q > 0.0);
    Variant { format, gzip }
}

/// /metrics from the last collection's exposition, in `variant`.
fn metrics(state: &AppState, variant: Variant) -> Resp {
    match state.telemetry.exposition(variant) {
        Ok(body) => {
            let mut r = respond(StatusCode::OK, variant.format.content_type(), body);
            if variant.gzip {
                r.headers_mut().insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            }
            r.headers_mut().insert(VARY, HeaderValue::from_static("Accept, Accept-Encoding"));
            r
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// The variant `headers` ask for.
fn variant_of(headers: &HeaderMap) -> Variant {
    let get = |h| headers.get(h).and_then(|v: &HeaderValue| v.to_str().ok());
    negotiate(get(ACCEPT), get(ACCEPT_ENCODING))
}

pub fn route(state: &AppState, method: &Method, path: &str, variant: Variant) -> Resp {
    let health = if health_endpoints::is_health_path(path) {
        match health_endpoints::parse(path) {
            Ok(endpoint) => Some(endpoint),
            Err((status, message)) => return error(status, &message),
        }
    } else {
        None
    };
    let known = health.is_some() || matches!(path, "/metrics" | "/peers");
    if path == "/events" {
        // a GET is answered with the stream before it gets here
        let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "/events is a stream: only GET");
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    if !known {
        return error(StatusCode::NOT_FOUND, "no such endpoint; see /metrics, /peers, /events, /health");
    }
    if method != Method::GET && method != Method::HEAD {
        let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD");
        r.headers_mut().insert(ALLOW, "GET, HEAD".parse().expect("valid header"));
        return r;
    }
    if let Some(endpoint) = health {
        let now_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let (status, body) = health_endpoints::respond(
            endpoint,
            &state.health.get(),
            &state.loop_status.get(),
            std::time::Instant::now(),
            now_unix,
        );
        return json_response(status, body);
    }
    match path {
        "/metrics" => metrics(state, variant),
        "/peers" => json_response(StatusCode::OK, peers(&state.net.get())),
        _ => unreachable!("checked above"),
    }
}

/// Every open P2P connection of every target, not cut to the top N;
/// `truncated` when the kernel's table (`limits.max_connections`) was full
/// or could not track some connection since the previous read, so some may
/// be missing.
pub fn peers(net: &NetSnapshot) -> serde_json::Value {
    let targets: Vec<_> =
        net.targets.iter().map(|t| json!({ "name": t.name, "peers": t.p2p_peers().collect::<Vec<_>>() })).collect();
    json!({ "targets": targets, "truncated": net.truncated })
}

/// The endpoints a liveness or readiness probe asks (/health/agent is the
/// agent's own readiness, the DaemonSet's readinessProbe): answered past
/// every bound (connections, request rate).
pub fn is_probe(path: &str) -> bool {
    matches!(path, "/health" | "/health/live" | "/health/ready" | "/health/agent")
}

/// How long a connection in the probe room may take to send its request:
/// a probe sends it at once.
const PROBE_ROOM_FIRST_REQUEST: Duration = Duration::from_secs(1);
/// hyper's read and write buffers per connection: a request head fits, and
/// a client that pipelines requests and never reads the replies holds at
/// most this much plus the one response in flight.
const MAX_BUF: usize = 16 * 1024;
/// The kernel's send buffer per connection (it doubles it): with the
/// client's receive window, what a client that never reads makes the
/// agent write before it waits, rather than the megabytes of autotuning.
const SEND_BUF: libc::c_int = 64 * 1024;
/// File descriptors left to the rest of the agent when the connection
/// bounds are fitted under RLIMIT_NOFILE.
const FD_MARGIN: usize = 16;

/// Requests per second per client: one bucket per IPv4 address or IPv6 /64.
type KeyedLimiter = governor::DefaultKeyedRateLimiter<IpAddr>;

/// The key of a client's bucket: its IPv4 address, or its IPv6 /64 (one
/// host holds a whole /64).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Which room a connection was admitted into.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Room {
    General,
    Probe,
}

/// What a connection's task and its IO share: when bytes last moved, since
/// when a write has waited on the client, whether a request came, and the
/// way to close it from outside.
struct Activity {
    epoch: Instant,
    /// ms since epoch of the last byte read or written
    last_io: AtomicU64,
    /// ms since epoch + 1 of the first write that found the socket full; 0: none
    write_blocked: AtomicU64,
    requested: AtomicBool,
    evict: tokio::sync::Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            last_io: AtomicU64::new(0),
            write_blocked: AtomicU64::new(0),
            requested: AtomicBool::new(false),
            evict: tokio::sync::Notify::new(),
        }
    }
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
    fn moved(&self) {
        self.last_io.store(self.now_ms(), Ordering::Relaxed);
    }
}

/// Why a connection was closed by the listener rather than by its client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expiry {
    Idle,
    Write,
    ProbeRoom,
}

/// The verdict of the watchdog at `now_ms` on a connection.
fn expired(act: &Activity, room: Room, now_ms: u64, idle: Duration, write: Duration) -> Option<Expiry> {
    let blocked = act.write_blocked.load(Ordering::Relaxed);
    if blocked > 0 && now_ms.saturating_sub(blocked - 1) >= write.as_millis() as u64 {
        return Some(Expiry::Write);
    }
    if room == Room::Probe
        && !act.requested.load(Ordering::Relaxed)
        && now_ms >= PROBE_ROOM_FIRST_REQUEST.as_millis() as u64
    {
        return Some(Expiry::ProbeRoom);
    }
    if blocked == 0 && now_ms.saturating_sub(act.last_io.load(Ordering::Relaxed)) >= idle.as_millis() as u64 {
        return Some(Expiry::Idle);
    }
    None
}

/// The TCP stream with its reads and writes noted in `Activity`.
struct Watched {
    io: TcpStream,
    act: Arc<Activity>,
}

impl Watched {
    fn note_write(&self, r: &Poll<std::io::Result<usize>>) {
        match r {
            Poll::Pending => {
                let since = self.act.now_ms() + 1;
                let _ = self.act.write_blocked.compare_exchange(0, since, Ordering::Relaxed, Ordering::Relaxed);
            }
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.act.write_blocked.store(0, Ordering::Relaxed);
                self.act.moved();
            }
            Poll::Ready(_) => {}
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.act.moved();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        self.note_write(&r);
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.note_write(&r);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The connections being served, each room's by age: in the probe room the
/// oldest that has sent nothing makes way for a new connection when it is
/// full; in the general room one makes way for a client whose request
/// arrived in the probe room (`HttpGuard::make_way`).
#[derive(Default)]
struct Rooms {
    general: Vec<(u64, IpAddr, Arc<Activity>)>,
    probe: Vec<(u64, Arc<Activity>)>,
    next_id: u64,
}

/// A general-room connection this old that has sent no request is taken
/// for one held open to fill the room (a client sends its request at once).
const SILENT_AFTER: Duration = Duration::from_secs(1);

/// A connection's place; dropping it frees the place.
struct Place {
    guard: Arc<HttpGuard>,
    room: Room,
    id: u64,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut rooms = self.guard.rooms.lock().unwrap_or_else(|p| p.into_inner());
        match self.room {
            Room::General => rooms.general.retain(|(id, _, _)| *id != self.id),
            Room::Probe => rooms.probe.retain(|(id, _)| *id != self.id),
        }
        // a descriptor is free: an accept waiting out EMFILE may try now
        self.guard.freed.notify_one();
    }
}

/// Counts of what the listener turned away or closed, exported as
/// nodescope_http_rejected_total and nodescope_http_closed_total.
#[derive(Default)]
struct Counters {
    /// closed at accept: both rooms full of connections in the middle of a request
    connections: AtomicU64,
    /// a request other than a probe in the probe room: 503
    probe_room: AtomicU64,
    /// 429
    rate: AtomicU64,
    /// probe room connections that made way for a newer one
    evicted: AtomicU64,
    /// general room connections that made way for a client with a request
    made_way: AtomicU64,
    idle: AtomicU64,
    write: AtomicU64,
    accept_errors: AtomicU64,
}

/// The listener's bounds: connections served at once (with room kept for
/// probes), a token bucket per client on requests other than probes, idle
/// and write timeouts. What they turn away is counted and exported.
pub struct HttpGuard {
    /// replaced whole on SIGHUP (`reconfigure`)
    bounds: std::sync::RwLock<Arc<Bounds>>,
    rooms: Mutex<Rooms>,
    /// one /metrics or /peers encoding at a time
    encoding: tokio::sync::Semaphore,
    /// a connection closed (its descriptor is free)
    freed: tokio::sync::Notify,
    counters: Arc<Counters>,
}

/// The settings of `[http]` the listener applies, other than its address.
struct Bounds {
    max_general: usize,
    max_probe: usize,
    idle_timeout: Duration,
    write_timeout: Duration,
    limiter: Option<Arc<KeyedLimiter>>,
    /// (requests_per_second, burst) the limiter was made for
    rate: (u32, u32),
}

impl Bounds {
    /// `config`'s bounds, the rooms fitted under the descriptors `free`
    /// now plus those the listener already holds (`held`); the buckets of
    /// `old` kept when the rate is the same.
    fn new(config: &HttpConfig, held: usize, old: Option<&Bounds>) -> Bounds {
        let rate = (config.requests_per_second, config.burst);
        let limiter = match old {
            Some(o) if o.rate == rate => o.limiter.clone(),
            _ => NonZeroU32::new(config.requests_per_second).map(|r| {
                let burst = NonZeroU32::new(config.burst).unwrap_or(r);
                Arc::new(governor::RateLimiter::keyed(governor::Quota::per_second(r).allow_burst(burst)))
            }),
        };
        let (mut max_general, mut max_probe) = (config.max_connections, config.probe_connections);
        if let Some(free) = free_descriptors() {
            let (g, p) = fit_rooms(max_general, max_probe, free + held);
            if (g, p) != (max_general, max_probe) {
                tracing::warn!(
                    "http.max_connections {max_general} + http.probe_connections {max_probe} do not fit the open-file limit ({} descriptors free): serving {g} + {p} connections",
                    free + held
                );
                (max_general, max_probe) = (g, p);
            }
        }
        Bounds {
            max_general,
            max_probe,
            idle_timeout: config.idle_timeout,
            write_timeout: config.write_timeout,
            limiter,
            rate,
        }
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard one (as systemd and Go do for
/// their services: the soft 1024 is for select(2), which nothing here uses)
/// and returns the soft limit now in force (None: unknown).
pub fn raise_descriptor_limit() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    Some(lim.rlim_cur)
}

/// The number of descriptors still free for connections (None: unknown).
fn free_descriptors() -> Option<usize> {
    let limit = raise_descriptor_limit()?;
    let open = std::fs::read_dir("/proc/self/fd").ok()?.count();
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    Some(limit.saturating_sub(open))
}

/// Fits (general, probe) under `free` descriptors less FD_MARGIN, the
/// probe room keeping at least a quarter.
fn fit_rooms(general: usize, probe: usize, free: usize) -> (usize, usize) {
    let budget = free.saturating_sub(FD_MARGIN).max(2);
    if general + probe <= budget {
        return (general, probe);
    }
    let probe = probe.min((budget / 4).max(1));
    (budget.saturating_sub(probe).clamp(1, general), probe)
}

impl HttpGuard {
    pub fn new(config: &HttpConfig, meter: &opentelemetry::metrics::Meter) -> HttpGuard {
        let guard = HttpGuard {
            bounds: std::sync::RwLock::new(Arc::new(Bounds::new(config, 0, None))),
            rooms: Mutex::default(),
            encoding: tokio::sync::Semaphore::new(1),
            freed: tokio::sync::Notify::new(),
            counters: Arc::default(),
        };
        let c = guard.counters.clone();
        meter
            .u64_observable_counter("nodescope.http.rejected")
            .with_description("HTTP connections closed at accept with both rooms busy (connections), requests other than probes past http.max_connections answered 503 (probe_room), and requests answered 429 past http.requests_per_second of their client (rate)")
            .with_callback(move |o| {
                o.observe(c.connections.load(Ordering::Relaxed), &[opentelemetry::KeyValue::new("reason", "connections")]);
                o.observe(c.probe_room.load(Ordering::Relaxed), &[opentelemetry::KeyValue::new("reason", "probe_room")]);
                o.observe(c.rate.load(Ordering::Relaxed), &[opentelemetry::KeyValue::new("reason", "rate")]);
            })
            .build();
        let c = guard.counters.clone();
        meter
            .u64_observable_counter("nodescope.http.closed")
            .with_description("HTTP connections the agent closed: idle past http.idle_timeout (idle), a client not reading past http.write_timeout (write), probe room connections that sent no request in time or made way for a newer one (probe_room), connections past http.max_connections that made way for another client's request (made_way)")
            .with_callback(move |o| {
                o.observe(c.idle.load(Ordering::Relaxed), &[opentelemetry::KeyValue::new("reason", "idle")]);
                o.observe(c.write.load(Ordering::Relaxed), &[opentelemetry::KeyValue::new("reason", "write")]);
                o.observe(c.evicted.load(Ordering::Relaxed), &[opentelemetry::KeyValue::new("reason", "probe_room")]);
                o.observe(c.made_way.load(Ordering::Relaxed), &[opentelemetry::KeyValue::new("reason", "made_way")]);
            })
            .build();
        let c = guard.counters.clone();
        meter
            .u64_observable_counter("nodescope.http.accept_errors")
            .with_description(
                "accept() failures on the HTTP listener (EMFILE: the open-file limit), each followed by a back-off",
            )
            .with_callback(move |o| o.observe(c.accept_errors.load(Ordering::Relaxed), &[]))
            .build();
        guard
    }

    fn bounds(&self) -> Arc<Bounds> {
        self.bounds.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A reloaded config's `[http]` bounds, for connections and requests from
    /// now on (a client's bucket is kept while the rate stays the same;
    /// connections over a lowered limit are not closed, only not replaced).
    /// `http.listen` is not among them: the socket stays bound.
    pub fn reconfigure(&self, config: &HttpConfig) {
        let held = {
            let rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
            rooms.general.len() + rooms.probe.len()
        };
        let mut bounds = self.bounds.write().unwrap_or_else(|e| e.into_inner());
        *bounds = Arc::new(Bounds::new(config, held, Some(&bounds)));
    }

    /// A place for a new connection: the general room, else the probe room
    /// (making way by closing its oldest connection that has sent nothing),
    /// else none.
    fn admit_connection(self: &Arc<Self>, ip: IpAddr, act: &Arc<Activity>) -> Option<Place> {
        let bounds = self.bounds();
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        rooms.next_id += 1;
        let id = rooms.next_id;
        if rooms.general.len() < bounds.max_general {
            rooms.general.push((id, client_key(ip), act.clone()));
            return Some(Place { guard: self.clone(), room: Room::General, id });
        }
        if rooms.probe.len() >= bounds.max_probe {
            let silent = rooms.probe.iter().position(|(_, a)| !a.requested.load(Ordering::Relaxed))?;
            // oldest first: the vector is in admission order
            let (_, old) = rooms.probe.remove(silent);
            old.evict.notify_one();
            self.counters.evicted.fetch_add(1, Ordering::Relaxed);
        }
        rooms.probe.push((id, act.clone()));
        Some(Place { guard: self.clone(), room: Room::Probe, id })
    }

    /// A request other than a probe came on a connection in the probe room
    /// (the general room was full when it connected): close a general
    /// connection in its favour, if one is the oldest that has sent nothing
    /// for SILENT_AFTER, or else the oldest of the client holding the most
    /// general connections when that is more than one over what `ip` holds.
    /// A client with requests to make thus gets in past connections held
    /// open and empty, and past another client's share.
    fn make_way(&self, ip: IpAddr) -> bool {
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        let silent = rooms
            .general
            .iter()
            .position(|(_, _, a)| !a.requested.load(Ordering::Relaxed) && a.epoch.elapsed() >= SILENT_AFTER);
        let victim = silent.or_else(|| {
            let mut held: std::collections::HashMap<IpAddr, usize> = std::collections::HashMap::new();
            for (_, key, _) in &rooms.general {
                *held.entry(*key).or_default() += 1;
            }
            let mine = held.get(&client_key(ip)).copied().unwrap_or(0);
            let (top, most) = held.into_iter().max_by_key(|(_, n)| *n)?;
            (most > mine + 1).then(|| rooms.general.iter().position(|(_, key, _)| *key == top)).flatten()
        });
        let Some(i) = victim else { return false };
        let (_, _, act) = rooms.general.remove(i);
        act.evict.notify_one();
        self.counters.made_way.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// 429 when `ip` is past its bucket.
    fn admit_request(&self, ip: IpAddr) -> Option<Resp> {
        let limiter = self.bounds().limiter.clone()?;
        let not_until = limiter.check_key(&client_key(ip)).err()?;
        self.counters.rate.fetch_add(1, Ordering::Relaxed);
        use governor::clock::Clock;
        let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let mut r = error(StatusCode::TOO_MANY_REQUESTS, "rate limit (http.requests_per_second per client)");
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
        Some(r)
    }

    /// GET /events: the stream of a new reader (crate::events), or why not.
    fn events(
        &self,
        room: Room,
        ip: IpAddr,
    ) -> Response<http_body_util::Either<Full<Bytes>, crate::events::EventBody>> {
        let refuse = |r: Resp| r.map(http_body_util::Either::Left);
        if room == Room::Probe {
            return refuse(error(StatusCode::SERVICE_UNAVAILABLE, "connection limit (http.max_connections)"));
        }
        if let Some(limited) = self.admit_request(ip) {
            return refuse(limited);
        }
        match crate::events::subscribe() {
            Some(body) => Response::builder()
                .header(CONTENT_TYPE, "text/event-stream")
                .header(hyper::header::CACHE_CONTROL, "no-cache")
                .body(http_body_util::Either::Right(body))
                .expect("static parts are valid"),
            None => refuse(error(StatusCode::SERVICE_UNAVAILABLE, "too many /events readers")),
        }
    }

    /// The answer to one request on a connection in `room` from `ip`: probes
    /// and refusals at once; /metrics and /peers encoded one at a time on
    /// the blocking pool, so the listener's workers stay free for probes
    /// whatever many clients ask for.
    async fn answer(
        self: Arc<Self>,
        state: Arc<AppState>,
        room: Room,
        ip: IpAddr,
        method: Method,
        path: String,
        variant: Variant,
    ) -> Resp {
        // one request per turn: a connection with many requests pipelined
        // waits behind the others (a probe among them) between any two
        tokio::task::yield_now().await;
        let started = Instant::now();
        if is_probe(&path) {
            let mut r = route(&state, &method, &path, variant);
            if room == Room::Probe {
                r.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
            }
            return r;
        }
        if room == Room::Probe && !self.make_way(ip) {
            self.counters.probe_room.fetch_add(1, Ordering::Relaxed);
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "connection limit (http.max_connections): only /health, /health/live, /health/ready and /health/agent are answered past it");
            r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
            r.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
        let mut r = match self.admit_request(ip) {
            Some(limited) => limited,
            None => {
                let Ok(_turn) = self.encoding.acquire().await else {
                    return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
                };
                let scrape = path == "/metrics" && method == Method::GET;
                let st = state.clone();
                let r = tokio::task::spawn_blocking(move || route(&st, &method, &path, variant))
                    .await
                    .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "handler failed"));
                if scrape && r.status() == StatusCode::OK {
                    let size = hyper::body::Body::size_hint(r.body()).exact().unwrap_or(0);
                    state.self_metrics.scraped(variant.format.as_str(), variant.gzip, started.elapsed(), size as usize);
                }
                r
            }
        };
        if room == Room::Probe {
            // served in the probe room's place: one request
            r.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

/// Doubling pause after a failed accept (EMFILE leaves the connection in
/// the backlog: retrying at once spins), from 10 ms to 1 s.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);
    fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }
    fn fail(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }
    fn succeed(&mut self) {
        self.next = Self::FIRST;
    }
}

/// At most one line per `every`; the lines held back are counted in the next.
struct LogLimiter {
    every: Duration,
    last: Option<Instant>,
    held: u64,
}

impl LogLimiter {
    fn new(every: Duration) -> LogLimiter {
        LogLimiter { every, last: None, held: 0 }
    }
    /// Some(lines held back since the last one) when a line may be written now.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|l| now.duration_since(l) < self.every) {
            self.held += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
}

pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    guard: Arc<HttpGuard>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // buckets of clients that have not asked for a while are forgotten
    {
        let guard = guard.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tick.tick().await;
                if let Some(l) = &guard.bounds().limiter {
                    l.retain_recent();
                    l.shrink_to_fit();
                }
            }
        });
    }
    let mut backoff = Backoff::new();
    let mut log = LogLimiter::new(Duration::from_secs(1));
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => {
                    backoff.succeed();
                    conn
                }
                Err(e) => {
                    guard.counters.accept_errors.fetch_add(1, Ordering::Relaxed);
                    let pause = backoff.fail();
                    if let Some(held) = log.allow(Instant::now()) {
                        let more = if held > 0 { format!(" ({held} more since the last line)") } else { String::new() };
                        tracing::warn!("accept: {e}{more}; retrying in {pause:?}");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = guard.freed.notified() => {}
                        _ = stop.changed() => return,
                    }
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let act = Arc::new(Activity::new());
        let Some(place) = guard.admit_connection(peer.ip(), &act) else {
            guard.counters.connections.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        tokio::spawn(connection(stream, peer.ip(), act, place, state.clone()));
    }
}

/// Serves one connection until its client closes it, or it is idle, or its
/// client stops reading, or it makes way in the probe room.
async fn connection(stream: TcpStream, ip: IpAddr, act: Arc<Activity>, place: Place, state: Arc<AppState>) {
    let _ = stream.set_nodelay(true);
    {
        use std::os::fd::AsRawFd;
        // SAFETY: setsockopt on a socket this task owns, with an int option value.
        unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                &SEND_BUF as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    let guard = place.guard.clone();
    let room = place.room;
    let svc = {
        let (guard, act) = (guard.clone(), act.clone());
        service_fn(move |req: Request<Incoming>| {
            act.requested.store(true, Ordering::Relaxed);
            let variant = variant_of(req.headers());
            let events = req.method() == Method::GET && req.uri().path() == "/events";
            let events = events.then(|| guard.events(room, ip));
            let answer = guard.clone().answer(
                state.clone(),
                room,
                ip,
                req.method().clone(),
                req.uri().path().to_string(),
                variant,
            );
            async move {
                match events {
                    Some(r) => Ok::<_, Infallible>(r),
                    None => Ok(answer.await.map(http_body_util::Either::Left)),
                }
            }
        })
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(guard.bounds().idle_timeout.min(Duration::from_secs(10)))
        .max_buf_size(MAX_BUF)
        .keep_alive(room == Room::General);
    let conn = builder.serve_connection(TokioIo::new(Watched { io: stream, act: act.clone() }), svc);
    tokio::pin!(conn);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    // hyper's header read timeout (the idle timeout, at most
                    // 10 s) closed a connection that sent no whole request:
                    // an idle keep-alive connection, or a slow one
                    if e.is_timeout() {
                        guard.counters.idle.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::debug!("http connection: {e}");
                }
                break;
            }
            _ = act.evict.notified() => break,
            _ = tick.tick() => {
                let b = guard.bounds();
                match expired(&act, room, act.now_ms(), b.idle_timeout, b.write_timeout) {
                    Some(Expiry::Idle) => {
                        guard.counters.idle.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Some(Expiry::Write) => {
                        guard.counters.write.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Some(Expiry::ProbeRoom) => {
                        guard.counters.evicted.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    None => {}
                }
            }
        }
    }
    drop(place);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_says_when_the_kernel_table_cut_it_short() {
        let mut net = NetSnapshot::default();
        assert_eq!(peers(&net), json!({ "targets": [], "truncated": false }));
        net.truncated = true;
        assert_eq!(peers(&net)["truncated"], true);
    }

    #[test]
    fn content_negotiation() {
        let v = |a: Option<&str>, e: Option<&str>| {
            let v = negotiate(a, e);
            (v.format, v.gzip)
        };
        // what Prometheus 2.42 sends by default
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(v(Some(prom), Some("gzip")), (Format::OpenMetrics, true));
        assert_eq!(v(None, None), (Format::Text, false));
        assert_eq!(v(Some("*/*"), Some("deflate, br")), (Format::Text, false));
        assert_eq!(v(Some("text/plain;version=0.0.4"), Some("gzip;q=0")), (Format::Text, false));
        assert_eq!(v(Some("text/plain;q=0.9, application/openmetrics-text;q=0.5"), None), (Format::Text, false));
        assert_eq!(v(Some("application/openmetrics-text; version=1.0.0"), Some("br, *")), (Format::OpenMetrics, true));
        assert_eq!(v(Some("application/openmetrics-text;q=0"), Some("GZIP")), (Format::Text, true));
    }

    #[test]
    fn backoff_doubles_to_a_second_and_resets() {
        let mut b = Backoff::new();
        let waits: Vec<u64> = (0..9).map(|_| b.fail().as_millis() as u64).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.succeed();
        assert_eq!(b.fail(), Duration::from_millis(10));
        // a second of failures costs a handful of retries, not a busy loop
        let mut b = Backoff::new();
        let (mut t, mut n) = (Duration::ZERO, 0);
        while t < Duration::from_secs(5) {
            t += b.fail();
            n += 1;
        }
        assert!(n <= 12, "{n} retries in 5 s");
    }

    #[test]
    fn log_limiter_one_line_per_period_counting_the_rest() {
        let mut l = LogLimiter::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(l.allow(t0), Some(0));
        for i in 1..1000 {
            assert_eq!(l.allow(t0 + Duration::from_micros(i)), None);
        }
        assert_eq!(l.allow(t0 + Duration::from_secs(1)), Some(999));
    }

    #[test]
    fn client_keys() {
        let k = |s: &str| client_key(s.parse().unwrap()).to_string();
        assert_eq!(k("192.0.2.7"), "192.0.2.7");
        assert_eq!(k("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(k("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::");
        assert_eq!(k("2001:db8:1:2::9"), k("2001:db8:1:2:ffff::1"));
    }

    #[test]
    fn rooms_fit_the_open_file_limit() {
        assert_eq!(fit_rooms(128, 16, 10_000), (128, 16));
        assert_eq!(fit_rooms(128, 16, 64), (36, 12));
        assert_eq!(fit_rooms(128, 16, 20), (3, 1));
        assert_eq!(fit_rooms(128, 16, 0), (1, 1));
    }

    /// Whether `n` holds a notification (polled once, not waited on).
    fn fired(n: &tokio::sync::Notify) -> bool {
        use std::future::Future;
        let f = std::pin::pin!(n.notified());
        f.poll(&mut Context::from_waker(std::task::Waker::noop())).is_ready()
    }

    #[test]
    fn a_client_with_a_request_gets_in_past_silent_and_greedy_connections() {
        let config = HttpConfig { max_connections: 3, probe_connections: 2, ..HttpConfig::default() };
        let guard = Arc::new(HttpGuard::new(&config, &opentelemetry::global::meter("test")));
        let greedy: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let conn = |ip: IpAddr, aged: bool, requested: bool| {
            let mut act = Activity::new();
            if aged {
                act.epoch -= SILENT_AFTER;
            }
            act.requested.store(requested, Ordering::Relaxed);
            let act = Arc::new(act);
            (guard.admit_connection(ip, &act).unwrap(), act)
        };
        // three busy connections of one client fill the general room
        let held: Vec<_> = (0..3).map(|_| conn(greedy, true, true)).collect();
        assert!(held.iter().all(|(p, _)| p.room == Room::General));
        let (late, _) = conn(greedy, false, false);
        assert_eq!(late.room, Room::Probe);
        // the same client gets no more than it holds
        assert!(!guard.make_way(greedy));
        // another one gets the oldest of the client holding the most
        assert!(guard.make_way(other));
        assert!(fired(&held[0].1.evict));
        assert_eq!(guard.rooms.lock().unwrap().general.len(), 2);
        // a silent connection makes way before a busy one, for anyone
        let (_silent_place, silent) = conn(other, true, false);
        assert!(guard.make_way(greedy));
        assert!(fired(&silent.evict));
        assert!(!fired(&held[1].1.evict));
    }

    #[test]
    fn watchdog_verdicts() {
        let act = Activity::new();
        let (idle, write) = (Duration::from_secs(30), Duration::from_secs(10));
        assert_eq!(expired(&act, Room::General, 5_000, idle, write), None);
        assert_eq!(expired(&act, Room::Probe, 1_000, idle, write), Some(Expiry::ProbeRoom));
        assert_eq!(expired(&act, Room::General, 30_000, idle, write), Some(Expiry::Idle));
        act.last_io.store(29_000, Ordering::Relaxed);
        act.write_blocked.store(20_001, Ordering::Relaxed);
        assert_eq!(expired(&act, Room::General, 29_999, idle, write), None);
        assert_eq!(expired(&act, Room::General, 30_000, idle, write), Some(Expiry::Write));
    }
}

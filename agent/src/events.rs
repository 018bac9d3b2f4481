//! `/events`: a server-sent events stream of connection opens, closes and
//! failed connects, and of health rule transitions, for scripts and
//! terminals.
//!
//! Publishers never wait: each reader has a bounded queue, and a reader
//! whose queue is full when an event comes is dropped (its stream ends,
//! `nodescope.events.readers.dropped` counts it) rather than slowing the
//! collection loop. Connection events of one collection are published in
//! the order the kernel saw them (by their kernel timestamps), so a close
//! never comes before its open.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Bytes, Frame, SizeHint};
use opentelemetry::metrics::Meter;
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Events a reader may have queued before it counts as too slow: more than
/// one collection interval brings on a busy node.
pub const QUEUE: usize = 2048;

/// Readers at once; past it a new one is refused (503).
pub const MAX_READERS: usize = 64;

/// A comment line this often keeps idle streams (and the HTTP idle timeout) alive.
const HEARTBEAT: Duration = Duration::from_secs(5);

struct Hub {
    readers: Mutex<Vec<mpsc::Sender<Bytes>>>,
    /// Connection events of the collection under way, by kernel time.
    pending: Mutex<Vec<(u64, Value)>>,
    /// Readers now, checked before any event is formatted.
    count: AtomicUsize,
    next_id: AtomicU64,
    dropped: AtomicU64,
}

static HUB: Hub = Hub {
    readers: Mutex::new(Vec::new()),
    pending: Mutex::new(Vec::new()),
    count: AtomicUsize::new(0),
    next_id: AtomicU64::new(1),
    dropped: AtomicU64::new(0),
};

/// Registers the hub's instruments.
pub fn register(meter: &Meter) {
    meter
        .u64_observable_counter("nodescope.events.readers.dropped")
        .with_description("/events readers dropped because they did not keep up (their queue was full)")
        .with_callback(|o| o.observe(HUB.dropped.load(Ordering::Relaxed), &[]))
        .build();
    meter
        .i64_observable_gauge("nodescope.events.readers")
        .with_description("/events readers connected")
        .with_callback(|o| o.observe(HUB.count.load(Ordering::Relaxed) as i64, &[]))
        .build();
}

/// Whether anyone listens: publishers skip building events otherwise.
pub fn listening() -> bool {
    HUB.count.load(Ordering::Relaxed) > 0
}

/// A connection event seen by the kernel at `boot_ns`, held until `flush`
/// sorts the collection's events by that time.
pub fn connection(boot_ns: u64, event: &'static str, mut fields: serde_json::Map<String, Value>) {
    if !listening() {
        return;
    }
    fields.insert("at".into(), json!(crate::bpf::boot_ns_to_unix(boot_ns)));
    fields.insert("event".into(), json!(event));
    HUB.pending.lock().expect("events lock").push((boot_ns, Value::Object(fields)));
}

/// A connection event with the fields every kind has (`extra` adds to them).
#[allow(clippy::too_many_arguments)]
pub fn conn(
    boot_ns: u64,
    event: &'static str,
    target: &str,
    direction: &str,
    service: &str,
    address: std::net::IpAddr,
    port: u16,
    local_port: u16,
    extra: Value,
) {
    if !listening() {
        return;
    }
    let mut m = serde_json::Map::new();
    m.insert("target".into(), json!(target));
    m.insert("direction".into(), json!(direction));
    m.insert("service".into(), json!(service));
    m.insert("address".into(), json!(address.to_string()));
    m.insert("port".into(), json!(port));
    m.insert("local_port".into(), json!(local_port));
    if let Value::Object(extra) = extra {
        m.extend(extra);
    }
    connection(boot_ns, event, m);
}

/// Publishes the collection's connection events, oldest first.
pub fn flush() {
    let mut pending = std::mem::take(&mut *HUB.pending.lock().expect("events lock"));
    if pending.is_empty() {
        return;
    }
    pending.sort_by_key(|(ns, _)| *ns);
    for (_, ev) in pending {
        let kind = ev["event"].as_str().unwrap_or("connection").to_string();
        publish(&kind, ev);
    }
}

/// A rule's transition on a target.
pub fn rule(target: &str, rule: &str, severity: &str, from: &str, to: &str, evidence: &Value) {
    if !listening() {
        return;
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    publish(
        "rule",
        json!({
            "event": "rule",
            "target": target,
            "rule": rule,
            "severity": severity,
            "from": from,
            "to": to,
            "at": now,
            "evidence": evidence,
        }),
    );
}

/// Sends one event to every reader; a reader with a full queue is dropped.
fn publish(kind: &str, data: Value) {
    let mut readers = HUB.readers.lock().expect("events lock");
    if readers.is_empty() {
        return;
    }
    let id = HUB.next_id.fetch_add(1, Ordering::Relaxed);
    let frame = Bytes::from(format!("id: {id}\nevent: {kind}\ndata: {data}\n\n"));
    readers.retain(|tx| match tx.try_send(frame.clone()) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            HUB.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::info!("an /events reader fell {QUEUE} events behind: dropped");
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    });
    HUB.count.store(readers.len(), Ordering::Relaxed);
}

/// A new reader's stream, or None when MAX_READERS are connected.
pub fn subscribe() -> Option<EventBody> {
    let mut readers = HUB.readers.lock().expect("events lock");
    readers.retain(|tx| !tx.is_closed());
    if readers.len() >= MAX_READERS {
        HUB.count.store(readers.len(), Ordering::Relaxed);
        return None;
    }
    let (tx, rx) = mpsc::channel(QUEUE);
    readers.push(tx);
    HUB.count.store(readers.len(), Ordering::Relaxed);
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Some(EventBody { rx, heartbeat, hello: true })
}

/// The response body of one reader: its queued events as they come, a
/// comment line when there were none for a while; it ends when the hub
/// drops the reader.
pub struct EventBody {
    rx: mpsc::Receiver<Bytes>,
    heartbeat: tokio::time::Interval,
    /// A first comment, so a client knows at once it is subscribed.
    hello: bool,
}

impl Body for EventBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if std::mem::take(&mut self.hello) {
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b": subscribed\n\n")))));
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(b)) => {
                self.heartbeat.reset();
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        match self.heartbeat.poll_tick(cx) {
            Poll::Ready(_) => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b": keep-alive\n\n"))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        false
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for EventBody {
    fn drop(&mut self) {
        self.rx.close();
        // forget closed readers now rather than at the next event
        if let Ok(mut readers) = HUB.readers.lock() {
            readers.retain(|tx| !tx.is_closed());
            HUB.count.store(readers.len(), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hub is process-wide: one test drives it through its cases.
    #[tokio::test]
    async fn readers_get_events_in_kernel_order_and_a_full_one_is_dropped() {
        use http_body_util::BodyExt;
        let mut fast = subscribe().unwrap();
        let slow = subscribe().unwrap();
        assert!(listening());
        let hello = fast.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&hello[..], b": subscribed\n\n");
        let field = |p: u16| {
            let mut m = serde_json::Map::new();
            m.insert("port".into(), json!(p));
            m
        };
        // published out of order within a collection: delivered by kernel time
        connection(30, "close", field(1));
        connection(10, "open", field(1));
        connection(20, "open", field(2));
        flush();
        let mut got = Vec::new();
        for _ in 0..3 {
            let f = fast.frame().await.unwrap().unwrap().into_data().unwrap();
            let text = String::from_utf8(f.to_vec()).unwrap();
            let data: Value =
                serde_json::from_str(text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap()).unwrap();
            got.push((data["event"].as_str().unwrap().to_string(), data["port"].as_u64().unwrap()));
        }
        assert_eq!(got, [("open".into(), 1), ("open".into(), 2), ("close".into(), 1)]);

        // `slow` never reads: past QUEUE events it is dropped, `fast` is not
        let before = HUB.dropped.load(Ordering::Relaxed);
        for i in 0..QUEUE as u64 {
            rule("t", "no_peers", "critical", "ok", "pending", &json!({ "i": i }));
            fast.frame().await.unwrap().unwrap();
        }
        assert_eq!(HUB.dropped.load(Ordering::Relaxed), before + 1);
        assert_eq!(HUB.readers.lock().unwrap().len(), 1);
        drop(slow);
        rule("t", "no_peers", "critical", "pending", "firing", &json!({}));
        let f = fast.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(String::from_utf8_lossy(&f).contains("\"to\":\"firing\""));
        drop(fast);
        assert!(!listening());
    }
}

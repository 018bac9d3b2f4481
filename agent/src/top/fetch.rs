//! A small blocking HTTP/1.1 GET for `nodescope top`: the agent is local
//! (or one hop away), its answers are small, and a terminal view must not
//! hang on it, so every step has a timeout.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Answers larger than this are refused (a /metrics of 5,000 series is ~1 MiB).
const MAX_BODY: usize = 64 << 20;

/// Where the agent listens: `http://host[:port][/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentUrl {
    pub host: String,
    pub port: u16,
    /// Prepended to every path (empty, or `/prefix` behind a reverse proxy).
    pub prefix: String,
    /// As the user wrote it, for messages.
    pub text: String,
}

impl AgentUrl {
    pub fn parse(url: &str) -> Result<AgentUrl, String> {
        let text = url.trim_end_matches('/').to_string();
        let rest = match url.split_once("://") {
            Some(("http", rest)) => rest,
            Some((scheme, _)) => {
                return Err(format!("{url}: only http:// is supported (not {scheme}://); the agent serves plain HTTP"))
            }
            None => url,
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| format!("{url}: unclosed [ in the address"))?;
            (h.to_string(), after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(format!("{url}: no host"));
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| format!("{url}: bad port {p:?}"))?,
            None => 80,
        };
        Ok(AgentUrl { host, port, prefix: path.trim_end_matches('/').to_string(), text })
    }
}

/// What went wrong asking the agent, worded for the person at the terminal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchError(pub String);

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn reason(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::ConnectionRefused => "connection refused".into(),
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "timed out".into(),
        ErrorKind::ConnectionReset => "connection reset".into(),
        _ => e.to_string(),
    }
}

/// A connection to the agent, trying each of its addresses within
/// `timeout`; the reason, worded for the terminal, when none answers.
fn connect(url: &AgentUrl, timeout: Duration) -> Result<TcpStream, String> {
    let addrs: Vec<SocketAddr> = (url.host.as_str(), url.port).to_socket_addrs().map_err(|e| e.to_string())?.collect();
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.map_or_else(|| "no address".into(), |e| reason(&e)))
}

/// GET `path` from the agent: (status, body). `timeout` bounds the connect
/// and the whole exchange.
pub fn get(url: &AgentUrl, path: &str, timeout: Duration) -> Result<(u16, String), FetchError> {
    let unreachable = |why: String| FetchError(format!("no nodescope agent at {}: {why}", url.text));
    let deadline = Instant::now() + timeout;
    let mut s = connect(url, timeout).map_err(unreachable)?;
    let io = |e: std::io::Error| unreachable(reason(&e));
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let host = if url.host.contains(':') { format!("[{}]", url.host) } else { url.host.clone() };
    // one write: a server that answers after the first segment must not see a half request
    let request = format!(
        "GET {}{path} HTTP/1.1\r\nHost: {host}:{}\r\nUser-Agent: nodescope-top\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        url.prefix, url.port
    );
    s.write_all(request.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(unreachable(format!("no complete answer to GET {path} within {timeout:?}")));
        }
        s.set_read_timeout(Some(left)).map_err(io)?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(e)),
        }
        if raw.len() > MAX_BODY {
            return Err(FetchError(format!("{}: the answer to GET {path} is over {MAX_BODY} bytes", url.text)));
        }
    }
    parse_response(&raw).map_err(|why| FetchError(format!("{}: GET {path}: {why}", url.text)))
}

/// One event of the agent's /events stream: its kind (open, close, failed,
/// rule) and its data.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEvent {
    pub kind: String,
    pub data: serde_json::Value,
}

/// Follows the agent's /events stream (server-sent events) on the calling
/// thread, handing each event to `tx`, until `tx`'s receiver is gone. A
/// failed connect or a stream that ends (the agent restarted) is tried
/// again two seconds later (the thread ends with the view's process); events
/// that arrive while `tx` is full are dropped (the view shows the last few
/// anyway).
pub fn follow_events(url: &AgentUrl, tx: &std::sync::mpsc::SyncSender<StreamEvent>) {
    use std::io::BufRead;
    use std::sync::mpsc::TrySendError;
    loop {
        if let Ok(mut s) = connect(url, Duration::from_secs(2)) {
            // HTTP/1.0: the stream comes as it is, not chunked, and ends with the connection
            let request = format!(
                "GET {}/events HTTP/1.0\r\nUser-Agent: nodescope-top\r\nAccept: text/event-stream\r\n\r\n",
                url.prefix
            );
            if s.write_all(request.as_bytes()).is_ok() {
                let mut lines = std::io::BufReader::new(s).lines();
                let ok = lines.next().and_then(Result::ok).is_some_and(|l| l.split(' ').nth(1) == Some("200"));
                let mut kind = String::new();
                for line in lines.map_while(Result::ok).take_while(|_| ok) {
                    if let Some(k) = line.strip_prefix("event: ") {
                        kind = k.to_string();
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        let Ok(data) = serde_json::from_str(d) else { continue };
                        match tx.try_send(StreamEvent { kind: std::mem::take(&mut kind), data }) {
                            Ok(()) | Err(TrySendError::Full(_)) => {}
                            Err(TrySendError::Disconnected(_)) => return,
                        }
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// (status, body) of a whole HTTP/1.x response.
pub fn parse_response(raw: &[u8]) -> Result<(u16, String), String> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("not an HTTP answer (no header end)")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "header is not text")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    if !status_line.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP answer: {status_line:?}"));
    }
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else { continue };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if k == "content-length" {
            length = v.parse::<usize>().ok();
        } else if k == "content-encoding" && !v.eq_ignore_ascii_case("identity") {
            return Err(format!("unexpected content-encoding {v}"));
        }
    }
    let mut body = &raw[end + 4..];
    let decoded;
    if chunked {
        decoded = dechunk(body)?;
        body = &decoded;
    } else if let Some(n) = length {
        if body.len() < n {
            return Err(format!("answer cut short: {} of {n} bytes", body.len()));
        }
        body = &body[..n];
    }
    Ok((status, String::from_utf8_lossy(body).into_owned()))
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = body.windows(2).position(|w| w == b"\r\n").ok_or("chunked body cut short")?;
        let size_text = std::str::from_utf8(&body[..eol]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| format!("bad chunk size {size_text:?}"))?;
        body = &body[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size + 2 {
            return Err("chunked body cut short".into());
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_parses_agent_urls() {
        let u = AgentUrl::parse("http://127.0.0.1:9464").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.prefix.as_str()), ("127.0.0.1", 9464, ""));
        let u = AgentUrl::parse("http://[::1]:9000/nodescope/").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.prefix.as_str()), ("::1", 9000, "/nodescope"));
        let u = AgentUrl::parse("localhost:9464").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("localhost", 9464));
        assert_eq!(AgentUrl::parse("http://node").unwrap().port, 80);
        assert!(AgentUrl::parse("https://x:1").unwrap_err().contains("only http://"));
        assert!(AgentUrl::parse("http://x:port").is_err());
    }

    #[test]
    fn top_reads_plain_and_chunked_answers() {
        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(parse_response(r).unwrap(), (200, "hello".to_string()));
        let r =
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(r).unwrap(), (503, "abcde".to_string()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nabc").is_err());
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }

    #[test]
    fn top_names_a_refused_connection() {
        // a port nobody listens on: bind, take the number, close
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = AgentUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let e = get(&url, "/peers", Duration::from_secs(2)).unwrap_err();
        assert_eq!(e.0, format!("no nodescope agent at http://127.0.0.1:{port}: connection refused"));
    }
}

//! The screen and the plain-text table of `nodescope top`, from the views
//! of model.rs. The screen fits 80x24: columns that do not fit are left
//! out from the right, rows from the bottom.

use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};

use super::model::{Churn, Disk, FileClass, PeerView, Rule, Sort, TargetView};

/// 1234 -> "1.2K": at most 5 characters, 1024-based.
pub fn human(n: f64) -> String {
    if !n.is_finite() {
        return "-".into();
    }
    let units = ["B", "K", "M", "G", "T", "P"];
    let mut v = n.abs();
    let mut u = 0;
    while v >= 1000.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    let sign = if n < 0.0 { "-" } else { "" };
    if u == 0 {
        format!("{sign}{v:.0}B")
    } else if v < 10.0 {
        format!("{sign}{v:.1}{}", units[u])
    } else {
        format!("{sign}{v:.0}{}", units[u])
    }
}

fn human_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), human)
}

/// Seconds as "42s", "5m03s", "2h05m", "3d04h".
pub fn age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Seconds as "850us", "1.2ms", "12ms", "1.20s".
pub fn latency(s: f64) -> String {
    if s < 0.001 {
        format!("{:.0}us", s * 1e6)
    } else if s < 0.01 {
        format!("{:.1}ms", s * 1e3)
    } else if s < 1.0 {
        format!("{:.0}ms", s * 1e3)
    } else {
        format!("{s:.2}s")
    }
}

fn per_min(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

/// "HH:MM:SS UTC" of unix seconds.
pub fn clock(unix: u64) -> String {
    let d = unix % 86_400;
    format!("{:02}:{:02}:{:02} UTC", d / 3600, (d % 3600) / 60, d % 60)
}

fn rule_ids(rules: &[Rule]) -> String {
    if rules.is_empty() {
        "none".into()
    } else {
        rules.iter().map(|r| format!("{} ({})", r.id, r.severity)).collect::<Vec<_>>().join(", ")
    }
}

fn direction_short(d: &str) -> &str {
    match d {
        "inbound" => "in",
        "outbound" => "out",
        d => d,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Align {
    Left,
    Right,
}

struct Col {
    title: &'static str,
    align: Align,
    /// Widest it may be on the screen (0: no limit).
    max: usize,
}

/// Lines of a table whose columns are as wide as their widest cell (cut at
/// `max` with '~' when `fit`), dropping columns from the right while the
/// table is wider than `width` (when given).
fn table(cols: &[Col], rows: &[Vec<String>], width: Option<usize>) -> Vec<String> {
    let fit = width.is_some();
    let mut widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let w = rows.iter().map(|r| r[i].chars().count()).chain([c.title.len()]).max().unwrap_or(0);
            if fit && c.max > 0 {
                w.min(c.max)
            } else {
                w
            }
        })
        .collect();
    if let Some(width) = width {
        while widths.len() > 1 && widths.iter().sum::<usize>() + 2 * (widths.len() - 1) > width {
            widths.pop();
        }
    }
    let cell = |text: &str, i: usize| {
        let w = widths[i];
        let mut t: String = text.to_string();
        if t.chars().count() > w {
            t = t.chars().take(w.saturating_sub(1)).collect::<String>() + "~";
        }
        match cols[i].align {
            Align::Left => format!("{t:<w$}"),
            Align::Right => format!("{t:>w$}"),
        }
    };
    let line = |cells: Vec<String>| cells.join("  ").trim_end().to_string();
    let mut out = vec![line((0..widths.len()).map(|i| cell(cols[i].title, i)).collect())];
    for r in rows {
        out.push(line((0..widths.len()).map(|i| cell(&r[i], i)).collect()));
    }
    out
}

/// The peer table: exact byte counts in plain text, short units on the screen.
fn peer_table(peers: &[PeerView], with_target: bool, width: Option<usize>) -> Vec<String> {
    let screen = width.is_some();
    let bytes = |n: u64| if screen { human(n as f64) } else { n.to_string() };
    let rate = |r: Option<f64>| match r {
        None => "-".to_string(),
        Some(r) if screen => human(r),
        Some(r) => format!("{r:.0}"),
    };
    let mut cols = Vec::new();
    if with_target {
        cols.push(Col { title: "TARGET", align: Align::Left, max: 10 });
    }
    cols.extend([
        Col { title: "ADDRESS", align: Align::Left, max: 21 },
        Col { title: if screen { "DIR" } else { "DIRECTION" }, align: Align::Left, max: 3 },
        Col { title: if screen { "SVC" } else { "SERVICE" }, align: Align::Left, max: 5 },
        Col { title: "NETGROUP", align: Align::Left, max: 15 },
        Col { title: "AGE", align: Align::Right, max: 6 },
        Col { title: if screen { "OUT/s" } else { "SENT/s" }, align: Align::Right, max: 5 },
        Col { title: if screen { "IN/s" } else { "RECEIVED/s" }, align: Align::Right, max: 5 },
        Col { title: "SENT", align: Align::Right, max: 5 },
        Col { title: if screen { "RECV" } else { "RECEIVED" }, align: Align::Right, max: 5 },
    ]);
    let rows: Vec<Vec<String>> = peers
        .iter()
        .map(|p| {
            let mut r = Vec::new();
            if with_target {
                r.push(p.peer.target.clone());
            }
            r.extend([
                p.peer.endpoint(),
                if screen { direction_short(&p.peer.direction).to_string() } else { p.peer.direction.clone() },
                p.peer.service.clone(),
                p.peer.netgroup.clone(),
                p.age.map_or_else(|| "-".into(), age),
                rate(p.sent_rate),
                rate(p.received_rate),
                bytes(p.peer.sent),
                bytes(p.peer.received),
            ]);
            r
        })
        .collect();
    table(&cols, &rows, width)
}

/// `files`: each class with its target's name, shown in a first column when `with_target`.
fn file_table(files: &[(&str, &FileClass)], with_target: bool, width: Option<usize>) -> Vec<String> {
    let screen = width.is_some();
    let mut cols = Vec::new();
    if with_target {
        cols.push(Col { title: "TARGET", align: Align::Left, max: 10 });
    }
    cols.extend([
        Col { title: "CLASS", align: Align::Left, max: 11 },
        Col { title: "WRITTEN", align: Align::Right, max: 7 },
        Col { title: if screen { "W/s" } else { "WRITTEN/s" }, align: Align::Right, max: 6 },
        Col { title: "WRITES/min", align: Align::Right, max: 10 },
        Col { title: "SYNCS/min", align: Align::Right, max: 9 },
        Col { title: "SYNC p50", align: Align::Right, max: 8 },
        Col { title: "p90", align: Align::Right, max: 6 },
        Col { title: "p99", align: Align::Right, max: 6 },
    ]);
    let rows: Vec<Vec<String>> = files
        .iter()
        .map(|(target, f)| {
            let q = |i: usize| f.sync_quantiles.map_or_else(|| "-".into(), |q| latency(q[i]));
            // quantiles since the agent started are marked: no sync in the window
            let mark = if f.quantiles_recent || f.sync_quantiles.is_none() { "" } else { "*" };
            let mut row = if with_target { vec![target.to_string()] } else { Vec::new() };
            row.extend([
                f.class.clone(),
                if screen { human(f.written.total) } else { format!("{:.0}", f.written.total) },
                match f.bytes_per_second {
                    Some(r) if !screen => format!("{r:.0}"),
                    r => human_opt(r),
                },
                per_min(f.writes.per_minute),
                per_min(f.syncs.per_minute),
                format!("{}{mark}", q(0)),
                q(1),
                q(2),
            ]);
            row
        })
        .collect();
    table(&cols, &rows, width)
}

/// Churn and failures per minute; `screen`: the short form for 80 columns.
fn churn_line(c: &Churn, screen: bool) -> String {
    let m = |c: &super::model::Counter| per_min(c.per_minute);
    let mut s = if screen {
        format!(
            "conn/min: p2p +{} -{}, all +{} -{}, failed {}",
            m(&c.p2p_opened),
            m(&c.p2p_closed),
            m(&c.opened),
            m(&c.closed),
            m(&c.failed)
        )
    } else {
        let over = c.window.map_or_else(String::new, |w| format!(" over {w:.0}s"));
        format!(
            "connections/min{over}: opened {} closed {} failed {} (p2p: opened {} closed {})",
            m(&c.opened),
            m(&c.closed),
            m(&c.failed),
            m(&c.p2p_opened),
            m(&c.p2p_closed)
        )
    };
    if let Some(open) = c.open {
        s += &format!("; open {open:.0}");
    }
    s
}

/// Failed connects since the agent started, by reason ("refused 3, timeout 1").
fn failures(c: &Churn) -> Option<String> {
    let by: Vec<String> = c.failed_by.iter().map(|(e, n)| format!("{e} {:.0}", n.total)).collect();
    (!by.is_empty()).then(|| by.join(", "))
}

fn disk_line(d: &Disk) -> String {
    let mut parts = vec![format!("data dir {}", human_opt(d.datadir_bytes))];
    if let (Some(avail), Some(size)) = (d.fs_available, d.fs_size) {
        parts.push(format!("{} free of {}", human(avail), human(size)));
    }
    if let Some(g) = d.growth_bytes_per_second {
        parts.push(format!("fs fills {}/s", human(g)));
    }
    parts.push(match d.days_until_full {
        Some(days) => format!("full in {days:.1} days"),
        None => "not filling".into(),
    });
    format!("disk: {}", parts.join(", "))
}

fn peers_summary(t: &TargetView) -> String {
    let inbound = t.peers.iter().filter(|p| p.peer.direction == "inbound").count();
    let mut netgroups: Vec<&str> = t.peers.iter().map(|p| p.peer.netgroup.as_str()).collect();
    netgroups.sort_unstable();
    netgroups.dedup();
    format!(
        "peers: {} ({} inbound, {} outbound), {} netgroups",
        t.peers.len(),
        inbound,
        t.peers.len() - inbound,
        netgroups.len()
    )
}

/// The plain-text report (`--once`, or stdout not a terminal).
pub fn plain(url: &str, unix: u64, sort: Sort, targets: &[TargetView]) -> String {
    let mut out = format!("nodescope top  {url}  {}  peers by {}\n", clock(unix), sort.name());
    if targets.is_empty() {
        out += "no targets\n";
    }
    for t in targets {
        out += &format!("\ntarget {}: {}\n", t.name, t.status);
        out += &format!("  firing: {}\n", rule_ids(&t.firing));
        out += &format!("  pending: {}\n", rule_ids(&t.pending));
        out += &format!("  {}\n", peers_summary(t));
        let mut peers = t.peers.clone();
        sort.apply(&mut peers);
        if !peers.is_empty() {
            for l in peer_table(&peers, false, None) {
                out += &format!("    {l}\n");
            }
        }
        out += &format!("  {}\n", churn_line(&t.churn, false));
        out += &format!(
            "  connections since start: opened {:.0} closed {:.0} failed {:.0}{}\n",
            t.churn.opened.total,
            t.churn.closed.total,
            t.churn.failed.total,
            failures(&t.churn).map_or_else(String::new, |f| format!(" ({f})"))
        );
        if t.files.is_empty() {
            out += "  files: no writes seen\n";
        } else {
            out += "  files (* sync latency since the agent started):\n";
            let rows: Vec<(&str, &FileClass)> = t.files.iter().map(|f| (t.name.as_str(), f)).collect();
            for l in file_table(&rows, false, None) {
                out += &format!("    {l}\n");
            }
        }
        out += &format!("  {}\n", disk_line(&t.disk));
    }
    out
}

fn verdict_style(status: &str) -> Style {
    let c = match status {
        "healthy" => Color::Green,
        "degraded" => Color::Yellow,
        "unhealthy" => Color::Red,
        _ => Color::Gray,
    };
    Style::default().fg(c).add_modifier(Modifier::BOLD)
}

/// What the screen shows around the data.
pub struct Screen<'a> {
    pub url: &'a str,
    /// The latest lines of /events (event_line), oldest first.
    pub events: &'a [String],
    pub unix: u64,
    pub sort: Sort,
    /// The target filter: None for all.
    pub filter: Option<&'a str>,
    pub paused: bool,
    /// The last reading failed: why.
    pub error: Option<&'a str>,
    pub width: usize,
    pub height: usize,
}

/// An /events event as one line of the live view, with its target (for the
/// target filter): its time, what happened, and to whom. None for what the
/// view does not show: connections of other services than peers (p2p,
/// proxy), and kinds it does not know.
pub fn event_line(e: &crate::top::fetch::StreamEvent) -> Option<(String, String)> {
    let d = &e.data;
    let text = |k: &str| d[k].as_str().unwrap_or("?").to_string();
    let at = d["at"].as_f64().map_or_else(|| "--:--:--".to_string(), |t| clock(t as u64)[..8].to_string());
    let peer = || {
        let address = text("address");
        let address = if address.contains(':') { format!("[{address}]") } else { address };
        format!("{} {} {address}:{}", direction_short(&text("direction")), text("service"), d["port"])
    };
    let target = text("target");
    // peers only: RPC clients (the operator's own scripts) would crowd them out
    if e.kind != "rule" && !matches!(d["service"].as_str(), Some("p2p" | "proxy")) {
        return None;
    }
    let what = match e.kind.as_str() {
        "open" => format!("open   {}", peer()),
        "close" => format!(
            "close  {} sent {} received {}",
            peer(),
            human(d["bytes_sent"].as_f64().unwrap_or(0.0)),
            human(d["bytes_received"].as_f64().unwrap_or(0.0))
        ),
        "failed" => format!("failed {} {}", peer(), text("reason")),
        "rule" => format!("rule   {} {} -> {}", text("rule"), text("from"), text("to")),
        _ => return None,
    };
    Some((target.clone(), format!("{at} {what} ({target})")))
}

/// The screen's lines, `height` of them at most.
pub fn screen<'a>(s: &Screen, targets: &[TargetView]) -> Vec<Line<'a>> {
    let w = s.width;
    let cut = |t: String| -> String { t.chars().take(w).collect() };
    let mut head = format!(
        "nodescope top {}  {}  sort:{}  {}",
        s.url,
        s.filter.map_or_else(|| "all targets".to_string(), |f| format!("target {f}")),
        s.sort.name(),
        clock(s.unix)
    );
    if s.paused {
        head = format!("PAUSED  {head}");
    }
    let mut top: Vec<Line> = vec![Line::styled(cut(head), Style::default().add_modifier(Modifier::REVERSED))];
    if let Some(e) = s.error {
        top.push(Line::styled(cut(format!("! {e}")), Style::default().fg(Color::Red)));
    }
    if targets.is_empty() {
        top.push(Line::raw("no targets"));
    }
    let many = targets.len() > 1;
    for t in targets {
        let prefix = "  ";
        let ids = |rules: &[Rule]| rules.iter().map(|r| r.id.as_str()).collect::<Vec<_>>().join(", ");
        let firing = if t.firing.is_empty() { "none".to_string() } else { ids(&t.firing) };
        let firing_style = if t.firing.iter().any(|r| r.severity == "critical") {
            Style::default().fg(Color::Red)
        } else if t.firing.is_empty() {
            Style::default()
        } else {
            Style::default().fg(Color::Yellow)
        };
        let mut l = Line::from(vec![
            Span::styled(t.name.clone(), Style::default().add_modifier(Modifier::BOLD)),
            Span::raw(" "),
            Span::styled(t.status.to_uppercase(), verdict_style(&t.status)),
            Span::raw("  firing: "),
            Span::styled(firing, firing_style),
        ]);
        // rules past the edge: keep what fits
        let mut left = w;
        for sp in l.spans.iter_mut() {
            let n = sp.content.chars().count();
            if n > left {
                sp.content = sp.content.chars().take(left).collect::<String>().into();
            }
            left = left.saturating_sub(n);
        }
        top.push(l);
        if !t.pending.is_empty() {
            top.push(Line::raw(cut(format!("{prefix}pending: {}", ids(&t.pending)))));
        }
        top.push(Line::raw(cut(format!("{prefix}{}", churn_line(&t.churn, true)))));
        if let Some(f) = failures(&t.churn) {
            top.push(Line::raw(cut(format!("{prefix}failed connects since start: {f}"))));
        }
        top.push(Line::raw(cut(format!("{prefix}{}", disk_line(&t.disk)))));
    }
    // files: each target's classes, at most 3 rows apiece on a screen of many targets
    let rows: Vec<(&str, &FileClass)> = targets
        .iter()
        .flat_map(|t| t.files.iter().take(if many { 3 } else { 5 }).map(|f| (t.name.as_str(), f)))
        .collect();
    let mut files: Vec<Line> = Vec::new();
    if !rows.is_empty() {
        let mut lines = file_table(&rows, many, Some(w));
        files.push(Line::styled(lines.remove(0), Style::default().add_modifier(Modifier::BOLD)));
        files.extend(lines.into_iter().map(Line::raw));
    }
    let keys = Line::styled(
        cut("s sort  t/tab target  p pause  q quit".to_string()),
        Style::default().add_modifier(Modifier::DIM),
    );

    let mut peers: Vec<PeerView> = targets.iter().flat_map(|t| t.peers.iter().cloned()).collect();
    s.sort.apply(&mut peers);
    let mut table = peer_table(&peers, many, Some(w));
    let header = table.remove(0);
    let total_peers = peers.len();

    let mut out = top;
    let inbound = peers.iter().filter(|p| p.peer.direction == "inbound").count();
    let mut netgroups: Vec<&str> = peers.iter().map(|p| p.peer.netgroup.as_str()).collect();
    netgroups.sort_unstable();
    netgroups.dedup();
    out.push(Line::raw(cut(format!(
        "peers: {total_peers} ({inbound} in, {} out), {} netgroups, by {}",
        total_peers - inbound,
        netgroups.len(),
        s.sort.name()
    ))));
    // the latest events, as many as fit in 3 lines, under a heading
    let mut events: Vec<Line> = Vec::new();
    if !s.events.is_empty() {
        events.push(Line::styled("events", Style::default().add_modifier(Modifier::BOLD)));
        let from = s.events.len().saturating_sub(3);
        events.extend(s.events[from..].iter().map(|e| Line::raw(cut(e.clone()))));
    }
    // the peer table takes what is left between the rest and the key line, at least 3 rows
    let reserved = out.len() + files.len() + events.len() + 1 + 1 + 1;
    let room = s.height.saturating_sub(reserved).max(3);
    out.push(Line::styled(cut(header), Style::default().add_modifier(Modifier::BOLD)));
    let shown = table.len().min(room);
    for l in table.into_iter().take(shown) {
        out.push(Line::raw(l));
    }
    if shown < total_peers {
        out.push(Line::styled(
            format!("  ... {} more", total_peers - shown),
            Style::default().add_modifier(Modifier::DIM),
        ));
    }
    out.extend(files);
    out.extend(events);
    out.truncate(s.height.saturating_sub(1));
    while out.len() < s.height.saturating_sub(1) {
        out.push(Line::raw(""));
    }
    out.push(keys);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_as_lines() {
        use crate::top::fetch::StreamEvent;
        let ev = |kind: &str, data: serde_json::Value| StreamEvent { kind: kind.into(), data };
        let at = 1_796_029_969.25; // 09:12:49 UTC
        let open = ev(
            "open",
            serde_json::json!({"at": at, "target": "ltc", "direction": "inbound", "service": "p2p", "address": "127.0.0.1", "port": 40001}),
        );
        assert_eq!(event_line(&open), Some(("ltc".into(), "09:12:49 open   in p2p 127.0.0.1:40001 (ltc)".into())));
        let close = ev(
            "close",
            serde_json::json!({"at": at, "target": "ltc", "direction": "outbound", "service": "proxy", "address": "::1", "port": 9050, "bytes_sent": 2048, "bytes_received": 10}),
        );
        assert_eq!(event_line(&close).unwrap().1, "09:12:49 close  out proxy [::1]:9050 sent 2.0K received 10B (ltc)");
        let failed = ev(
            "failed",
            serde_json::json!({"at": at, "target": "x", "direction": "outbound", "service": "p2p", "address": "10.0.0.1", "port": 8333, "reason": "refused"}),
        );
        assert_eq!(event_line(&failed).unwrap().1, "09:12:49 failed out p2p 10.0.0.1:8333 refused (x)");
        let rule = ev(
            "rule",
            serde_json::json!({"at": 1_796_029_969u64, "target": "x", "rule": "no_peers", "from": "pending", "to": "firing"}),
        );
        assert_eq!(event_line(&rule).unwrap().1, "09:12:49 rule   no_peers pending -> firing (x)");
        assert_eq!(event_line(&ev("other", serde_json::json!({}))), None);
        let rpc = ev(
            "open",
            serde_json::json!({"at": at, "target": "x", "direction": "inbound", "service": "rpc", "address": "127.0.0.1", "port": 1}),
        );
        assert_eq!(event_line(&rpc), None, "RPC clients are not peers");
    }
    use crate::top::model::{Counter, Peer};

    fn view() -> TargetView {
        let peer = |addr: &str, port, dir: &str, sent| PeerView {
            peer: Peer {
                target: "ltc".into(),
                address: addr.into(),
                port,
                local_port: 19444,
                direction: dir.into(),
                service: "p2p".into(),
                sent,
                received: 2_000_000,
                connected_since: Some(1),
                netgroup: "127.0.0.0/16".into(),
            },
            age: Some(3725),
            sent_rate: Some(1500.0),
            received_rate: None,
        };
        TargetView {
            name: "ltc".into(),
            status: "degraded".into(),
            firing: vec![Rule { id: "low_peer_count".into(), severity: "warning".into(), state: "firing".into() }],
            pending: vec![],
            peers: (0..30)
                .map(|i| peer("127.0.0.1", 40000 + i, if i % 2 == 0 { "inbound" } else { "outbound" }, 123_456_789))
                .chain([peer("2001:db8:1234:5678:9abc:def0:1234:5678", 8333, "outbound", 1)])
                .collect(),
            churn: Churn {
                window: Some(60.0),
                opened: Counter { total: 10.0, per_minute: Some(2.0) },
                closed: Counter { total: 8.0, per_minute: Some(1.0) },
                failed: Counter { total: 3.0, per_minute: Some(0.0) },
                p2p_opened: Counter { total: 6.0, per_minute: Some(1.0) },
                p2p_closed: Counter { total: 4.0, per_minute: Some(0.5) },
                failed_by: vec![("refused".into(), Counter { total: 3.0, per_minute: Some(0.0) })],
                open: Some(31.0),
            },
            files: vec![FileClass {
                class: "blocks".into(),
                written: Counter { total: 5e9, per_minute: Some(6e6) },
                bytes_per_second: Some(1e5),
                writes: Counter { total: 100.0, per_minute: Some(10.0) },
                syncs: Counter { total: 10.0, per_minute: Some(1.0) },
                sync_quantiles: Some([0.0008, 0.004, 0.25]),
                quantiles_recent: false,
            }],
            disk: Disk {
                datadir_bytes: Some(5e9),
                fs_size: Some(1e11),
                fs_available: Some(4e10),
                growth_bytes_per_second: Some(1e4),
                days_until_full: Some(46.3),
            },
        }
    }

    #[test]
    fn top_units() {
        assert_eq!(human(999.0), "999B");
        assert_eq!(human(1536.0), "1.5K");
        assert_eq!(human(123_456_789.0), "118M");
        assert_eq!(age(3725), "1h02m");
        assert_eq!(age(59), "59s");
        assert_eq!(latency(0.0008), "800us");
        assert_eq!(latency(0.25), "250ms");
        assert_eq!(clock(86_400 + 3661), "01:01:01 UTC");
    }

    #[test]
    fn top_screen_fits_80x24() {
        let s = Screen {
            events: &[],
            url: "http://127.0.0.1:9464",
            unix: 0,
            sort: Sort::Rate,
            filter: None,
            paused: true,
            error: Some("no nodescope agent at http://127.0.0.1:9464: connection refused"),
            width: 80,
            height: 24,
        };
        let lines = screen(&s, &[view()]);
        assert_eq!(lines.len(), 24);
        let text: Vec<String> = lines.iter().map(|l| l.spans.iter().map(|s| s.content.as_ref()).collect()).collect();
        for l in &text {
            assert!(l.chars().count() <= 80, "{l:?} is {} wide", l.chars().count());
        }
        let all = text.join("\n");
        assert!(all.contains("PAUSED") && all.contains("DEGRADED") && all.contains("low_peer_count"), "{all}");
        assert!(all.contains("127.0.0.1:40000") && all.contains("more"), "{all}");
        assert!(all.contains("blocks") && all.contains("800us*"), "{all}");
        assert!(all.contains("full in 46.3 days"), "{all}");
        assert!(all.contains("conn/min: p2p +1.0 -0.5, all +2.0 -1.0, failed 0.0; open 31"), "{all}");
        assert!(all.contains("failed connects since start: refused 3"), "{all}");
        assert!(all.contains("peers: 31 (15 in, 16 out), 1 netgroups, by bytes/s"), "{all}");
        assert!(text[23].contains("q quit"));
    }

    #[test]
    fn top_screen_of_two_targets_fits_80x24() {
        let mut other = view();
        other.name = "bitcoin-mainnet".into();
        other.status = "unhealthy".into();
        for p in &mut other.peers {
            p.peer.target = other.name.clone();
        }
        let s = Screen {
            events: &[],
            url: "http://127.0.0.1:9464",
            unix: 0,
            sort: Sort::Address,
            filter: None,
            paused: false,
            error: None,
            width: 80,
            height: 24,
        };
        let lines = screen(&s, &[view(), other]);
        let text: Vec<String> = lines.iter().map(|l| l.spans.iter().map(|s| s.content.as_ref()).collect()).collect();
        assert_eq!(text.len(), 24);
        for l in &text {
            assert!(l.chars().count() <= 80, "{l:?} is {} wide", l.chars().count());
        }
        let all = text.join("\n");
        assert!(all.contains("ltc DEGRADED") && all.contains("bitcoin-mainnet UNHEALTHY"), "{all}");
        // the peer and file tables name each row's target
        assert_eq!(text.iter().filter(|l| l.starts_with("TARGET")).count(), 2, "{all}");
        assert!(text.iter().any(|l| l.starts_with("ltc ") && l.contains("blocks")), "{all}");
        assert!(text[23].contains("q quit"));
    }

    #[test]
    fn top_plain_has_exact_bytes() {
        let p = plain("http://x:1", 0, Sort::Bytes, &[view()]);
        assert!(p.contains("target ltc: degraded"), "{p}");
        let row = p.lines().find(|l| l.contains("127.0.0.1:40000")).unwrap();
        let f: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            f,
            ["127.0.0.1:40000", "inbound", "p2p", "127.0.0.0/16", "1h02m", "1500", "-", "123456789", "2000000"]
        );
        assert!(p.contains("[2001:db8:1234:5678:9abc:def0:1234:5678]:8333"), "{p}");
    }
}

//! `nodescope top`: a live terminal view of a running agent, read from its
//! HTTP endpoints (/health/detailed, /peers, /metrics). Needs no privilege:
//! it only asks the agent. Plain text when stdout is not a terminal.

mod fetch;
mod model;
mod prom;
mod render;

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

use fetch::{AgentUrl, FetchError};
use model::{History, Reading, Sort};

/// Each request's bound: the agent is local, an answer takes milliseconds.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Per-minute figures span the readings of this window.
const WINDOW: Duration = Duration::from_secs(60);

/// `--interval`: a humantime duration, at least 100ms.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = humantime_serde::re::humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(100) {
        return Err("must be at least 100ms".into());
    }
    Ok(d)
}

pub struct Options {
    pub url: String,
    pub once: bool,
    pub interval: Duration,
}

pub fn run(opts: Options) -> ExitCode {
    let url = match AgentUrl::parse(&opts.url) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("nodescope top: {e}");
            return ExitCode::from(2);
        }
    };
    let first = match model::read(&url, TIMEOUT) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nodescope top: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut history = History::new(WINDOW);
    history.push(first);
    let result = if opts.once {
        once(&url, &mut history, opts.interval)
    } else if std::io::stdout().is_terminal() {
        live(&url, history, opts.interval)
    } else {
        stream(&url, history, opts.interval)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // a closed pipe (`nodescope top | head`) ends the stream: no error
        Err(Failure::Closed) => ExitCode::SUCCESS,
        Err(Failure::Agent(e)) => {
            eprintln!("nodescope top: {e}");
            ExitCode::FAILURE
        }
        Err(Failure::Terminal(e)) => {
            eprintln!("nodescope top: terminal: {e}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Agent(FetchError),
    Terminal(std::io::Error),
    Closed,
}

fn write_out(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(|e| {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            Failure::Closed
        } else {
            Failure::Terminal(e)
        }
    })
}

/// One table: waits for two more collections of the agent so that rates
/// have a span (12 s at most, or two `interval`s when longer), then prints.
fn once(url: &AgentUrl, history: &mut History, interval: Duration) -> Result<(), Failure> {
    let deadline = Instant::now() + 2 * interval.max(Duration::from_secs(6));
    while history.len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        history.push(model::read(url, TIMEOUT).map_err(Failure::Agent)?);
    }
    let latest = history.latest().expect("one reading at least");
    write_out(&render::plain(&url.text, latest.unix, Sort::Rate, &history.view(None)))
}

/// Plain text every `interval`, for a pipe or a log.
fn stream(url: &AgentUrl, mut history: History, interval: Duration) -> Result<(), Failure> {
    loop {
        let latest = history.latest().expect("one reading at least");
        write_out(&(render::plain(&url.text, latest.unix, Sort::Rate, &history.view(None)) + "\n"))?;
        std::thread::sleep(interval);
        match model::read(url, TIMEOUT) {
            Ok(r) => {
                history.push(r);
            }
            Err(e) => write_out(&format!("nodescope top: {e}\n"))?,
        }
    }
}

/// Readings from a thread of their own, so a slow agent never holds up the keys.
fn reader(url: AgentUrl, interval: Duration) -> mpsc::Receiver<Result<Reading, FetchError>> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("nodescope-top-read".into())
        .spawn(move || loop {
            let started = Instant::now();
            if tx.send(model::read(&url, TIMEOUT)).is_err() {
                return;
            }
            std::thread::sleep(interval.saturating_sub(started.elapsed()));
        })
        .expect("spawning a thread");
    rx
}

struct Ui {
    sort: Sort,
    filter: Option<String>,
    paused: bool,
    error: Option<String>,
    /// Every target's view (frozen while paused); the filter applies when drawn.
    shown: Vec<model::TargetView>,
    shown_unix: u64,
    /// The latest /events lines, (target, line), oldest first, at most EVENTS_KEPT.
    events: VecDeque<(String, String)>,
    /// What the screen shows of them (frozen while paused).
    shown_events: Vec<(String, String)>,
}

/// /events lines kept for the view.
const EVENTS_KEPT: usize = 32;

impl Ui {
    fn refresh(&mut self, history: &History) {
        if self.paused {
            return;
        }
        self.shown_events = self.events.iter().cloned().collect();
        if let Some(latest) = history.latest() {
            self.shown = history.view(None);
            self.shown_unix = latest.unix;
        }
    }

    /// The next target filter: all, then each target, then all again.
    fn next_filter(&mut self, back: bool) {
        let mut names: Vec<Option<String>> = vec![None];
        names.extend(self.shown.iter().map(|t| Some(t.name.clone())));
        let at = names.iter().position(|n| *n == self.filter).unwrap_or(0);
        let n = names.len();
        self.filter = names[if back { (at + n - 1) % n } else { (at + 1) % n }].clone();
    }

    /// An /events event in, the oldest out past EVENTS_KEPT.
    fn event(&mut self, e: &fetch::StreamEvent) {
        if let Some(line) = render::event_line(e) {
            if self.events.len() == EVENTS_KEPT {
                self.events.pop_front();
            }
            self.events.push_back(line);
        }
    }

    /// The event lines of the targets the filter lets through.
    fn visible_events(&self) -> Vec<String> {
        self.shown_events
            .iter()
            .filter(|(t, _)| self.filter.as_ref().is_none_or(|f| f == t))
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// The targets the filter lets through.
    fn visible(&self) -> Vec<model::TargetView> {
        self.shown.iter().filter(|t| self.filter.as_ref().is_none_or(|f| *f == t.name)).cloned().collect()
    }
}

fn live(url: &AgentUrl, mut history: History, interval: Duration) -> Result<(), Failure> {
    let mut terminal = ratatui::try_init().map_err(Failure::Terminal)?;
    let readings = reader(url.clone(), interval);
    let mut ui = Ui {
        sort: Sort::Rate,
        filter: None,
        paused: false,
        error: None,
        shown: Vec::new(),
        shown_unix: 0,
        events: VecDeque::new(),
        shown_events: Vec::new(),
    };
    ui.refresh(&history);
    // the agent's /events, followed on a thread of their own (it ends with the process)
    let (events_tx, events_rx) = std::sync::mpsc::sync_channel(256);
    {
        let url = url.clone();
        std::thread::Builder::new()
            .name("top-events".into())
            .spawn(move || fetch::follow_events(&url, &events_tx))
            .expect("spawning a thread");
    }
    let result = (|| -> Result<(), Failure> {
        loop {
            terminal
                .draw(|f| {
                    let area = f.area();
                    let events = ui.visible_events();
                    let s = render::Screen {
                        url: &url.text,
                        events: &events,
                        unix: ui.shown_unix,
                        sort: ui.sort,
                        filter: ui.filter.as_deref(),
                        paused: ui.paused,
                        error: ui.error.as_deref(),
                        width: area.width as usize,
                        height: area.height as usize,
                    };
                    let lines = render::screen(&s, &ui.visible());
                    f.render_widget(ratatui::widgets::Paragraph::new(lines), area);
                })
                .map_err(Failure::Terminal)?;
            if event::poll(Duration::from_millis(200)).map_err(Failure::Terminal)? {
                match event::read().map_err(Failure::Terminal)? {
                    Event::Key(k) if k.kind != KeyEventKind::Release => match k.code {
                        KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => return Ok(()),
                        KeyCode::Char('s') => ui.sort = ui.sort.next(),
                        KeyCode::Char('t') | KeyCode::Tab => ui.next_filter(false),
                        KeyCode::Char('T') | KeyCode::BackTab => ui.next_filter(true),
                        KeyCode::Char('p') | KeyCode::Char(' ') => ui.paused = !ui.paused,
                        _ => {}
                    },
                    _ => {}
                }
                ui.refresh(&history);
            }
            let mut heard = false;
            while let Ok(e) = events_rx.try_recv() {
                ui.event(&e);
                heard = true;
            }
            if heard {
                ui.refresh(&history);
            }
            while let Ok(r) = readings.try_recv() {
                match r {
                    Ok(r) => {
                        ui.error = None;
                        history.push(r);
                    }
                    Err(e) => ui.error = Some(e.0),
                }
                ui.refresh(&history);
            }
        }
    })();
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_filter_goes_round_and_hides_the_others() {
        let view = |name: &str| model::TargetView { name: name.into(), ..Default::default() };
        let mut ui = Ui {
            sort: Sort::Rate,
            filter: None,
            paused: false,
            error: None,
            shown: vec![view("btc"), view("xmr")],
            shown_unix: 0,
            events: VecDeque::new(),
            shown_events: Vec::new(),
        };
        let names = |ui: &Ui| ui.visible().iter().map(|t| t.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&ui), ["btc", "xmr"]);
        ui.next_filter(false);
        assert_eq!((ui.filter.as_deref(), names(&ui)), (Some("btc"), vec!["btc".to_string()]));
        ui.next_filter(false);
        assert_eq!((ui.filter.as_deref(), names(&ui)), (Some("xmr"), vec!["xmr".to_string()]));
        ui.next_filter(false);
        assert_eq!((ui.filter.as_deref(), names(&ui).len()), (None, 2), "back to all");
        ui.next_filter(true);
        assert_eq!(ui.filter.as_deref(), Some("xmr"), "backwards from all: the last");
        // a target that went away: the filter shows nothing of it, and moves on
        ui.shown = vec![view("btc")];
        assert!(names(&ui).is_empty());
        ui.next_filter(false);
        assert_eq!(ui.filter.as_deref(), Some("btc"));
    }
}

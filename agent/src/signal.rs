//! What the collection loop asks of every signal. A signal (net, disk,
//! resources) is started by its own module, which registers its instruments
//! on the meter and publishes a snapshot that they, the health rules and
//! the HTTP side read; the loop only drives it. Adding a signal means
//! adding a module with a `start` that returns one of these.

use aya::maps::{MapData, RingBuf};

use crate::scope::ScopePlan;
use crate::target::Target;

pub trait Signal {
    /// Points the signal's kernel programs at the watched set (logging a
    /// failure itself). Signals without programs have nothing to do.
    fn set_scope(&mut self, _plan: &ScopePlan, _targets: &[Target]) {}

    /// The ring buffer the signal's scope programs write exec events to,
    /// for the loop to wait on; taken once.
    fn take_scope_events(&mut self) -> Option<RingBuf<MapData>> {
        None
    }

    /// One interval: read what was counted and publish the snapshot.
    fn collect(&mut self, targets: &[Target], plan: &ScopePlan);

    /// The name its part of the state file is kept under.
    fn name(&self) -> &'static str;

    /// What it keeps across agent restarts (crate::state), after a
    /// collection; None: nothing.
    fn save(&self) -> Option<serde_json::Value> {
        None
    }

    /// What an earlier agent saved, handed over before the first collection.
    fn restore(&mut self, _saved: serde_json::Value) {}
}

/// A signal's collection failures in its log: each distinct failure once,
/// not every interval, and one line when collection works again.
#[derive(Default)]
pub struct FailureLog {
    last: Option<String>,
}

impl FailureLog {
    pub fn failed(&mut self, signal: &str, e: &dyn std::fmt::Display) {
        let msg = e.to_string();
        if self.last.as_deref() != Some(msg.as_str()) {
            tracing::error!("{signal} collection failed: {msg}");
            self.last = Some(msg);
        }
    }

    pub fn worked(&mut self, signal: &str) {
        if self.last.take().is_some() {
            tracing::info!("{signal} collection works again");
        }
    }
}

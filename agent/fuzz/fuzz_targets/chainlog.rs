//! The node log line parsers: Bitcoin/Litecoin Core's debug.log and
//! monerod's bitmonero.log lines, and the hand-parsed ISO timestamps they
//! start with. Never panics; a time read is finite, and a tip's block time
//! and progress are finite when present.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodescope::chainlog::{line_time, parse_core_line, parse_monero_line, unix_time, Event};

fn check(event: Option<Event>) {
    if let Some(Event::Tip { block_time, progress, .. }) = event {
        assert!(block_time.is_none_or(f64::is_finite));
        assert!(progress.is_none_or(f64::is_finite));
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        check(parse_core_line(line));
        check(parse_monero_line(line));
        assert!(line_time(line).is_none_or(f64::is_finite));
        assert!(unix_time(line).is_none_or(f64::is_finite));
    }
});

//! Per-key byte totals with a bounded number of exported series.
//!
//! Used for peers and for netgroups. Each key keeps its cumulative totals
//! while it has open connections and for a TTL after its last one closed.
//! The export shows the `top` keys by bytes with their own series; the bytes
//! every other key gained while outside the top are added to one "other"
//! accumulator, so every exported counter only ever grows.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bytes {
    pub sent: u64,
    pub received: u64,
}

impl Bytes {
    fn total(&self) -> u64 {
        self.sent.saturating_add(self.received)
    }
}

#[derive(Debug)]
struct Entry {
    bytes: Bytes,
    /// Totals at the previous export, to find what it gained since.
    exported: Bytes,
    open: u32,
    last_closed: Instant,
}

#[derive(Debug)]
pub struct ByteBook<K> {
    entries: HashMap<K, Entry>,
    max_entries: usize,
    other: Bytes,
    /// Connections opened to keys refused because the book was full (their
    /// bytes went to "other"): counted once each at open, not at every add.
    pub overflowed: u64,
}

impl<K: Hash + Eq + Clone + Ord> ByteBook<K> {
    pub fn new(max_entries: usize) -> Self {
        ByteBook { entries: HashMap::new(), max_entries, other: Bytes::default(), overflowed: 0 }
    }

    /// A connection to `key` opened (or was first seen).
    pub fn open(&mut self, key: &K, now: Instant) {
        match self.entry(key, now) {
            Some(e) => e.open += 1,
            None => self.overflowed += 1,
        }
    }

    /// A connection to `key` closed.
    pub fn close(&mut self, key: &K, now: Instant) {
        if let Some(e) = self.entries.get_mut(key) {
            e.open = e.open.saturating_sub(1);
            e.last_closed = now;
        }
    }

    pub fn add(&mut self, key: &K, delta: Bytes, now: Instant) {
        match self.entry(key, now) {
            Some(e) => {
                e.bytes.sent += delta.sent;
                e.bytes.received += delta.received;
            }
            None => {
                self.other.sent += delta.sent;
                self.other.received += delta.received;
            }
        }
    }

    fn entry(&mut self, key: &K, now: Instant) -> Option<&mut Entry> {
        if !self.entries.contains_key(key) {
            if self.entries.len() >= self.max_entries {
                return None;
            }
            let fresh = Entry { bytes: Bytes::default(), exported: Bytes::default(), open: 0, last_closed: now };
            self.entries.insert(key.clone(), fresh);
        }
        self.entries.get_mut(key)
    }

    /// Drops keys whose last connection closed more than `ttl` ago.
    pub fn expire(&mut self, ttl: Duration, now: Instant) {
        self.entries.retain(|_, e| e.open > 0 || now.duration_since(e.last_closed) < ttl);
    }

    /// The book as the state file keeps it (crate::state).
    pub fn save(&self, now: Instant) -> SavedBook<K> {
        let mut entries: Vec<SavedEntry<K>> = self
            .entries
            .iter()
            .map(|(key, e)| SavedEntry {
                key: key.clone(),
                bytes: e.bytes,
                exported: e.exported,
                open: e.open,
                closed_secs_ago: now.duration_since(e.last_closed).as_secs(),
            })
            .collect();
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        SavedBook { entries, other: self.other, overflowed: self.overflowed }
    }

    /// A book as an earlier agent saved it, within this agent's bound (the
    /// keys with the most bytes kept; the rest folded into "other").
    pub fn restore(saved: SavedBook<K>, max_entries: usize, now: Instant) -> Self {
        let mut book = ByteBook::new(max_entries);
        book.other = saved.other;
        book.overflowed = saved.overflowed;
        let mut entries = saved.entries;
        entries.sort_by(|a, b| b.bytes.total().cmp(&a.bytes.total()).then_with(|| a.key.cmp(&b.key)));
        for e in entries {
            if book.entries.len() >= max_entries {
                // its bytes were exported under its own series or "other"
                // already; what it gains from now on goes to "other"
                book.overflowed += 1;
                continue;
            }
            let last_closed = now.checked_sub(Duration::from_secs(e.closed_secs_ago)).unwrap_or(now);
            book.entries.insert(e.key, Entry { bytes: e.bytes, exported: e.exported, open: e.open, last_closed });
        }
        book
    }

    /// The series to export: the `top` keys by total bytes, then "other"
    /// (None) when any bytes ever went there.
    pub fn export(&mut self, top: usize) -> Vec<(Option<K>, Bytes)> {
        let mut ranked: Vec<(&K, &mut Entry)> = self.entries.iter_mut().collect();
        // ties broken by key so the cut is stable from one export to the next
        ranked.sort_by(|a, b| b.1.bytes.total().cmp(&a.1.bytes.total()).then_with(|| a.0.cmp(b.0)));
        let mut out = Vec::with_capacity(top.min(ranked.len()) + 1);
        for (i, (key, e)) in ranked.into_iter().enumerate() {
            if i < top {
                out.push((Some(key.clone()), e.bytes));
            } else {
                self.other.sent += e.bytes.sent - e.exported.sent;
                self.other.received += e.bytes.received - e.exported.received;
            }
            e.exported = e.bytes;
        }
        if self.other.total() > 0 {
            out.push((None, self.other));
        }
        out
    }
}

/// A `ByteBook` in the state file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SavedBook<K> {
    entries: Vec<SavedEntry<K>>,
    other: Bytes,
    overflowed: u64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct SavedEntry<K> {
    key: K,
    bytes: Bytes,
    exported: Bytes,
    open: u32,
    closed_secs_ago: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(sent: u64, received: u64) -> Bytes {
        Bytes { sent, received }
    }

    #[test]
    fn top_cut_and_monotone_other() {
        let now = Instant::now();
        let mut book = ByteBook::new(10);
        for (k, n) in [(1, 100), (2, 50), (3, 10)] {
            book.open(&k, now);
            book.add(&k, b(n, 0), now);
        }
        let e = book.export(2);
        assert_eq!(e, vec![(Some(1), b(100, 0)), (Some(2), b(50, 0)), (None, b(10, 0))]);
        // 3 climbs into the top two; 2 drops out and its later bytes go to other
        book.add(&3, b(70, 0), now);
        book.add(&2, b(5, 0), now);
        let e = book.export(2);
        assert_eq!(e, vec![(Some(1), b(100, 0)), (Some(3), b(80, 0)), (None, b(15, 0))]);
    }

    #[test]
    fn saved_and_restored_exports_the_same() {
        let now = Instant::now();
        let mut book = ByteBook::new(10);
        for (k, n) in [(1, 100), (2, 50), (3, 10)] {
            book.open(&k, now);
            book.add(&k, b(n, 1), now);
        }
        let before = book.export(2);
        let json = serde_json::to_string(&book.save(now)).unwrap();
        let mut back = ByteBook::<i32>::restore(serde_json::from_str(&json).unwrap(), 10, now);
        assert_eq!(back.export(2), before);
        // later bytes of a key outside the top still go to "other", counted once
        back.add(&3, b(5, 0), now);
        assert_eq!(back.export(2).last(), Some(&(None, b(15, 1))));
        // a smaller bound keeps the biggest keys
        let small = ByteBook::<i32>::restore(serde_json::from_str(&json).unwrap(), 1, now);
        assert_eq!(small.entries.len(), 1);
        assert!(small.entries.contains_key(&1));
        assert_eq!(small.overflowed, 2);
    }

    #[test]
    fn bound_and_ttl() {
        let t0 = Instant::now();
        let mut book = ByteBook::new(1);
        book.open(&"a", t0);
        book.open(&"b", t0);
        book.add(&"b", b(7, 7), t0);
        assert_eq!(book.overflowed, 1);
        assert_eq!(book.export(5), vec![(Some("a"), b(0, 0)), (None, b(7, 7))]);
        book.close(&"a", t0);
        book.expire(Duration::from_secs(60), t0 + Duration::from_secs(59));
        assert_eq!(book.entries.len(), 1);
        book.expire(Duration::from_secs(60), t0 + Duration::from_secs(61));
        assert_eq!(book.entries.len(), 0);
    }

    #[test]
    fn an_overflowed_connection_counts_once() {
        // one connection to a peer past the bound: opened, bytes added in
        // several reads, closed; it is one overflow, not one per read
        let now = Instant::now();
        let mut book = ByteBook::new(1);
        book.open(&"kept", now);
        book.open(&"late", now);
        for _ in 0..3 {
            book.add(&"late", b(1, 2), now);
        }
        book.close(&"late", now);
        assert_eq!(book.overflowed, 1);
        assert_eq!(book.export(1), vec![(Some("kept"), b(0, 0)), (None, b(3, 6))]);
        // a second connection of that peer while the book is still full
        book.open(&"late", now);
        book.add(&"late", b(0, 0), now);
        assert_eq!(book.overflowed, 2);
    }
}

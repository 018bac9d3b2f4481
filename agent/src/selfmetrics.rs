//! The agent's own figures: what its eBPF programs cost the kernel (when
//! `kernel.bpf_stats_enabled` is on), how full its kernel maps are, how long
//! collections and scrapes take, and which build is running.
//!
//! The programs and maps are the agent's own: those its process holds a
//! descriptor of (/proc/self/fdinfo names their ids), read once per interval
//! into a snapshot the instruments' callbacks read.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::{Histogram, Meter};
use opentelemetry::KeyValue;

use crate::snapshot::Shared;

/// One of the agent's eBPF programs.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgramStats {
    pub id: u32,
    pub name: String,
    pub kind: String,
    pub run_time: Duration,
    pub run_count: u64,
}

/// One of the agent's kernel maps. `entries` is counted for hash maps only
/// (an array always holds its capacity; a ring buffer holds bytes).
#[derive(Debug, Clone, PartialEq)]
pub struct MapFill {
    pub id: u32,
    pub name: String,
    pub kind: String,
    pub entries: Option<u64>,
    pub capacity: u64,
}

#[derive(Debug, Clone, Default)]
pub struct BpfSelfSnapshot {
    /// kernel.bpf_stats_enabled; None when unreadable
    pub stats_enabled: Option<bool>,
    /// keyed by the kernel's id: two objects may hold maps of one name
    /// (each signal its own scope maps), or a program of one name
    pub programs: BTreeMap<u32, ProgramStats>,
    pub maps: BTreeMap<u32, MapFill>,
}

/// Program and map ids the process holds descriptors of, from /proc/self/fdinfo.
fn own_ids() -> (BTreeSet<u32>, BTreeSet<u32>) {
    let (mut progs, mut maps) = (BTreeSet::new(), BTreeSet::new());
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else { return (progs, maps) };
    for entry in dir.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else { continue };
        for line in info.lines() {
            if let Some(id) = line.strip_prefix("prog_id:").and_then(|v| v.trim().parse().ok()) {
                progs.insert(id);
            } else if let Some(id) = line.strip_prefix("map_id:").and_then(|v| v.trim().parse().ok()) {
                maps.insert(id);
            }
        }
    }
    (progs, maps)
}

fn stats_enabled() -> Option<bool> {
    let v = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").ok()?;
    Some(v.trim() != "0")
}

/// The number of keys of the map behind `fd` (BPF_MAP_GET_NEXT_KEY until the
/// end), at most `limit`.
fn count_keys(fd: std::os::fd::BorrowedFd<'_>, key_size: usize, limit: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
        _rest: [u64; 13],
    }
    let mut key = vec![0u8; key_size.max(1)];
    let mut next = vec![0u8; key_size.max(1)];
    let mut n = 0u64;
    let mut first = true;
    while n < limit {
        let attr = Attr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            // a null key asks for the first one
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            _rest: [0; 13],
        };
        // SAFETY: BPF_MAP_GET_NEXT_KEY reads `key` (key_size bytes) and
        // writes `next_key` (key_size bytes); both buffers are that long.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                4, /* BPF_MAP_GET_NEXT_KEY */
                &attr as *const Attr,
                std::mem::size_of::<Attr>(),
            )
        };
        if r != 0 {
            return (std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT)).then_some(n);
        }
        n += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
    Some(n)
}

/// Reads the agent's own programs and maps now.
pub fn read_bpf() -> BpfSelfSnapshot {
    let (prog_ids, map_ids) = own_ids();
    let mut snap = BpfSelfSnapshot { stats_enabled: stats_enabled(), ..Default::default() };
    if !prog_ids.is_empty() {
        for info in aya::programs::loaded_programs().flatten() {
            if !prog_ids.contains(&info.id()) {
                continue;
            }
            snap.programs.insert(
                info.id(),
                ProgramStats {
                    id: info.id(),
                    name: info.name_as_str().unwrap_or("").to_string(),
                    kind: format!("{:?}", info.program_type()).trim_start_matches("BPF_PROG_TYPE_").to_lowercase(),
                    run_time: info.run_time(),
                    run_count: info.run_count(),
                },
            );
        }
    }
    for id in map_ids {
        let Ok(info) = aya::maps::MapInfo::from_id(id) else { continue };
        let kind = info.map_type().map(|t| format!("{t:?}")).unwrap_or_else(|_| "unknown".into());
        let hashed = matches!(kind.as_str(), "Hash" | "LruHash" | "PerCpuHash" | "LruPerCpuHash");
        let entries = if hashed {
            info.fd().ok().and_then(|fd| {
                use std::os::fd::AsFd;
                count_keys(fd.as_fd(), info.key_size() as usize, u64::from(info.max_entries()) + 1)
            })
        } else {
            None
        };
        snap.maps.insert(
            id,
            MapFill {
                id,
                name: info.name_as_str().unwrap_or("").to_string(),
                kind: snake(&kind),
                entries,
                capacity: u64::from(info.max_entries()),
            },
        );
    }
    snap
}

/// `LruHash` -> `lru_hash`.
fn snake(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Counts the agent keeps about itself.
#[derive(Default)]
pub struct SelfCounters {
    /// SIGHUP reloads applied, and rejected (the old config kept running)
    pub reloads_applied: AtomicU64,
    pub reloads_rejected: AtomicU64,
}

/// The instruments that are recorded where things happen.
#[derive(Clone)]
pub struct SelfMetrics {
    collection: Histogram<f64>,
    scrape: Histogram<f64>,
    scrape_size: Histogram<u64>,
    pub counters: Arc<SelfCounters>,
}

/// Buckets for collection and scrape durations: 100 µs to 10 s.
const DURATION_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const SIZE_BUCKETS: &[f64] = &[1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0];

impl SelfMetrics {
    pub fn register(meter: &Meter, bpf: Shared<BpfSelfSnapshot>) -> SelfMetrics {
        meter
            .u64_gauge("nodescope.build_info")
            .with_description("Always 1: the running nodescope's version and the commit it was built from (GIT_COMMIT at build time, else unknown)")
            .build()
            .record(
                1,
                &[
                    KeyValue::new("version", env!("CARGO_PKG_VERSION")),
                    KeyValue::new("commit", option_env!("GIT_COMMIT").unwrap_or("unknown")),
                ],
            );
        let snap = bpf.clone();
        meter
            .u64_observable_gauge("nodescope.bpf.stats_enabled")
            .with_description("1 when kernel.bpf_stats_enabled is on and the kernel times the agent's eBPF programs (nodescope_bpf_program_* series), 0 when it is off (no such series)")
            .with_callback(move |o| {
                if let Some(on) = snap.get().stats_enabled {
                    o.observe(u64::from(on), &[]);
                }
            })
            .build();
        let snap = bpf.clone();
        meter
            .f64_observable_counter("nodescope.bpf.program.run_time")
            .with_unit("s")
            .with_description("Time the kernel spent running each of the agent's eBPF programs since it was loaded, while kernel.bpf_stats_enabled was on")
            .with_callback(move |o| {
                let s = snap.get();
                if s.stats_enabled == Some(true) {
                    for p in s.programs.values() {
                        o.observe(p.run_time.as_secs_f64(), &program_attrs(p));
                    }
                }
            })
            .build();
        let snap = bpf.clone();
        meter
            .u64_observable_counter("nodescope.bpf.program.runs")
            .with_description(
                "Runs of each of the agent's eBPF programs since it was loaded, while kernel.bpf_stats_enabled was on",
            )
            .with_callback(move |o| {
                let s = snap.get();
                if s.stats_enabled == Some(true) {
                    for p in s.programs.values() {
                        o.observe(p.run_count, &program_attrs(p));
                    }
                }
            })
            .build();
        let snap = bpf.clone();
        meter
            .u64_observable_gauge("nodescope.bpf.map.entries")
            .with_description("Entries in each of the agent's hash maps (arrays and ring buffers have none to count)")
            .with_callback(move |o| {
                for m in snap.get().maps.values() {
                    if let Some(n) = m.entries {
                        o.observe(n, &map_attrs(m));
                    }
                }
            })
            .build();
        let snap = bpf;
        meter
            .u64_observable_gauge("nodescope.bpf.map.capacity")
            .with_description("max_entries of each of the agent's kernel maps (bytes for a ring buffer)")
            .with_callback(move |o| {
                for m in snap.get().maps.values() {
                    o.observe(m.capacity, &map_attrs(m));
                }
            })
            .build();
        crate::events::register(meter);
        let counters = Arc::new(SelfCounters::default());
        let c = counters.clone();
        meter
            .u64_observable_counter("nodescope.state.histograms_restarted")
            .with_description(
                "Saved histograms of a target that restarted from zero at start: more observations than the agent replays (crate::state::MAX_HISTOGRAM_REPLAY)",
            )
            .with_callback(|o| o.observe(crate::state::histograms_restarted(), &[]))
            .build();
        meter
            .u64_observable_counter("nodescope.config.reloads")
            .with_description(
                "Config reloads on SIGHUP: applied, or rejected (the running config kept, the reason logged)",
            )
            .with_callback(move |o| {
                o.observe(c.reloads_applied.load(Ordering::Relaxed), &[KeyValue::new("result", "applied")]);
                o.observe(c.reloads_rejected.load(Ordering::Relaxed), &[KeyValue::new("result", "rejected")]);
            })
            .build();
        SelfMetrics {
            counters,
            collection: meter
                .f64_histogram("nodescope.collection.duration")
                .with_unit("s")
                .with_description("Time of one collection: every signal read and its snapshot published")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            scrape: meter
                .f64_histogram("nodescope.scrape.duration")
                .with_unit("s")
                .with_description("Time to answer GET /metrics, from the request to its body ready (the network aside), by format and compression")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            scrape_size: meter
                .u64_histogram("nodescope.scrape.size")
                .with_unit("By")
                .with_description("Body size of GET /metrics answers as sent, by format and compression")
                .with_boundaries(SIZE_BUCKETS.to_vec())
                .build(),
        }
    }

    pub fn collected(&self, took: Duration) {
        self.collection.record(took.as_secs_f64(), &[]);
    }

    pub fn scraped(&self, format: &'static str, gzip: bool, took: Duration, bytes: usize) {
        let attrs = [KeyValue::new("format", format), KeyValue::new("compression", if gzip { "gzip" } else { "none" })];
        self.scrape.record(took.as_secs_f64(), &attrs);
        self.scrape_size.record(bytes as u64, &attrs);
    }
}

fn program_attrs(p: &ProgramStats) -> [KeyValue; 3] {
    [
        KeyValue::new("program", p.name.clone()),
        KeyValue::new("type", p.kind.clone()),
        KeyValue::new("id", i64::from(p.id)),
    ]
}

fn map_attrs(m: &MapFill) -> [KeyValue; 3] {
    [KeyValue::new("map", m.name.clone()), KeyValue::new("type", m.kind.clone()), KeyValue::new("id", i64::from(m.id))]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_kinds_in_snake_case() {
        assert_eq!(snake("LruHash"), "lru_hash");
        assert_eq!(snake("RingBuf"), "ring_buf");
        assert_eq!(snake("Array"), "array");
    }
}

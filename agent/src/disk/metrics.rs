//! The disk signal's instruments. Counters are observable and read the
//! latest `DiskSnapshot`; the sync latency histogram is synchronous and fed
//! from each new snapshot's per-interval counts.
//!
//! The kernel keeps log2 latency histograms; Prometheus wants an OTel
//! histogram. The instrument's bucket bounds are exactly the kernel's slot
//! bounds (2^(i+1) microseconds), and for each slot the `count` new calls are
//! recorded as `count` measurements of one value inside that slot's bucket:
//! the slot's mean (the kernel also sums latencies per slot). So every
//! `_bucket` and `_count` equals the kernel's counts, and `_sum` equals the
//! kernel's sum up to float rounding.

use opentelemetry::metrics::{Histogram, Meter};
use opentelemetry::KeyValue;

use super::{bucket_bounds_seconds, DiskSnapshot, SyncSlotDelta};
use crate::bpf::abi;
use crate::snapshot::Shared;

pub const TARGET: &str = "nodescope.target";
const CLASS: &str = "nodescope.file.class";
const WRITE_CALL: &str = "nodescope.write.call";
const SYNC_CALL: &str = "nodescope.sync.call";
const DROP_REASON: &str = "nodescope.drop.reason";
const FS_TYPE: &str = "nodescope.filesystem.type";
const METHOD: &str = "nodescope.disk.method";

pub struct DiskMetrics {
    sync_duration: Histogram<f64>,
}

impl DiskMetrics {
    pub fn register(meter: &Meter, disk: Shared<DiskSnapshot>) -> DiskMetrics {
        let s = disk.clone();
        meter
            .u64_observable_counter("nodescope.file.written")
            .with_unit("By")
            .with_description("Bytes the node wrote to its files, by file class and call (call mmap: whole folios dirtied through a shared mapping)")
            .with_callback(move |o| {
                for t in &s.get().targets {
                    for ((class, call), w) in &t.writes_by_call {
                        o.observe(w.bytes, &[
                            KeyValue::new(TARGET, t.name.clone()),
                            KeyValue::new(CLASS, class.clone()),
                            KeyValue::new(WRITE_CALL, *call),
                        ]);
                    }
                }
            })
            .build();

        let s = disk.clone();
        meter
            .u64_observable_counter("nodescope.file.writes")
            .with_description("Write calls the node made to its files, by file class and call (syscall, io_uring, or mmap: folios dirtied through a mapping)")
            .with_callback(move |o| {
                for t in &s.get().targets {
                    for ((class, call), w) in &t.writes_by_call {
                        o.observe(w.calls, &[
                            KeyValue::new(TARGET, t.name.clone()),
                            KeyValue::new(CLASS, class.clone()),
                            KeyValue::new(WRITE_CALL, *call),
                        ]);
                    }
                }
            })
            .build();

        let s = disk.clone();
        meter
            .u64_observable_counter("nodescope.file.syncs")
            .with_description(
                "Sync calls (fsync, fdatasync, msync...) on the node's files that reached the filesystem, timed or not",
            )
            .with_callback(move |o| {
                for t in &s.get().targets {
                    for ((class, call), n) in &t.sync_counts {
                        o.observe(
                            *n,
                            &[
                                KeyValue::new(TARGET, t.name.clone()),
                                KeyValue::new(CLASS, class.clone()),
                                KeyValue::new(SYNC_CALL, *call),
                            ],
                        );
                    }
                }
            })
            .build();

        let s = disk.clone();
        meter
            .u64_observable_gauge("nodescope.disk.covered")
            .with_description("1 when the disk signal's hooks see the writes to the node's data dir (its filesystem is hooked, or the syscall method is on), else 0")
            .with_callback(move |o| {
                let snap = s.get();
                if !snap.available {
                    return;
                }
                for t in &snap.targets {
                    let (Some(fs), Some(covered)) = (&t.coverage.filesystem, t.coverage.covered) else { continue };
                    o.observe(u64::from(covered), &[
                        KeyValue::new(TARGET, t.name.clone()),
                        KeyValue::new(FS_TYPE, fs.clone()),
                        KeyValue::new(METHOD, snap.method),
                    ]);
                }
            })
            .build();

        let s = disk.clone();
        meter
            .u64_observable_counter("nodescope.file.sync.errors")
            .with_description("Sync calls on the node's files that returned an error (where the filesystem reports it: ext4, or the syscall method)")
            .with_callback(move |o| {
                for t in &s.get().targets {
                    for ((class, call), n) in &t.sync_errors {
                        o.observe(*n, &[
                            KeyValue::new(TARGET, t.name.clone()),
                            KeyValue::new(CLASS, class.clone()),
                            KeyValue::new(SYNC_CALL, *call),
                        ]);
                    }
                }
            })
            .build();

        let s = disk;
        meter
            .u64_observable_counter("nodescope.disk.dropped")
            .with_description(
                "File writes and syncs the disk signal could not count, by reason (a full kernel map, a target gone)",
            )
            .with_callback(move |o| {
                let snap = s.get();
                if !snap.available {
                    return;
                }
                let d = snap.dropped;
                for (reason, n) in [
                    ("files_full", d.kernel.files_full),
                    ("syncs_full", d.kernel.syncs_full),
                    ("inflight_full", d.kernel.inflight_full),
                    ("target_gone", d.target_gone),
                    ("unattributed", d.unattributed),
                ] {
                    o.observe(n, &[KeyValue::new(DROP_REASON, reason)]);
                }
            })
            .build();

        let sync_duration = meter
            .f64_histogram("nodescope.file.sync.duration")
            .with_unit("s")
            .with_description(
                "Time the node's sync calls took in the filesystem (ext4; every sync call with the syscall method)",
            )
            .with_boundaries(bucket_bounds_seconds())
            .build();
        DiskMetrics { sync_duration }
    }

    /// Feeds the calls a new snapshot adds to the histogram.
    pub fn record(&self, snap: &DiskSnapshot) {
        for t in &snap.targets {
            for d in &t.new_syncs {
                let value = representative(d);
                let attrs = [
                    KeyValue::new(TARGET, t.name.clone()),
                    KeyValue::new(CLASS, d.class.clone()),
                    KeyValue::new(SYNC_CALL, d.call),
                ];
                for _ in 0..d.count {
                    self.sync_duration.record(value, &attrs);
                }
            }
        }
    }
}

/// A value the histogram puts in the bucket of kernel slot `d.slot`: the
/// slot's mean latency, nudged inside the bucket's (lower, upper] range when
/// rounding or an exact lower edge would put it in a neighbour.
pub fn representative(d: &SyncSlotDelta) -> f64 {
    let mean = d.sum_ns as f64 / d.count.max(1) as f64 * 1e-9;
    let lower = if d.slot == 0 { f64::NEG_INFINITY } else { (1u64 << d.slot) as f64 * 1e-6 };
    let upper = if d.slot + 1 >= abi::DISK_SYNC_SLOTS { f64::INFINITY } else { (1u64 << (d.slot + 1)) as f64 * 1e-6 };
    mean.max(lower.next_up()).min(upper)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(slot: usize, count: u64, sum_ns: u64) -> SyncSlotDelta {
        SyncSlotDelta { class: "c".into(), call: "fsync", slot, count, sum_ns }
    }

    /// The bucket an OTel histogram puts `v` in: the first bound >= v.
    fn bucket(v: f64) -> usize {
        bucket_bounds_seconds().partition_point(|b| *b < v)
    }

    #[test]
    fn every_slot_lands_in_its_own_bucket() {
        for slot in 0..abi::DISK_SYNC_SLOTS {
            let lo_ns = if slot == 0 { 0 } else { (1u64 << slot) * 1000 };
            let hi_ns = (1u64 << (slot + 1)) * 1000 - 1;
            for ns in [lo_ns, (lo_ns + hi_ns) / 2, hi_ns] {
                assert_eq!(bucket(representative(&delta(slot, 3, ns * 3))), slot, "slot {slot}, {ns} ns");
            }
        }
        // the last slot is open-ended
        let last = abi::DISK_SYNC_SLOTS - 1;
        assert_eq!(bucket(representative(&delta(last, 1, 900 * 1_000_000_000))), last);
    }

    #[test]
    fn sum_is_kept() {
        let d = delta(10, 4, 4 * 1_500_000);
        assert!((representative(&d) * 4.0 - 0.006).abs() < 1e-12);
    }
}

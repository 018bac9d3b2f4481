//! The resource signal's instruments. All are observable and read the
//! latest published `ResourceSnapshot`; a figure that is None is not
//! observed, so its series is absent rather than zero.

use opentelemetry::metrics::Meter;
use opentelemetry::KeyValue;

use super::{ResourceSnapshot, TargetResources};
use crate::net::metrics::TARGET;
use crate::snapshot::Shared;

const DEVICE: &str = "system.device";
const DISK_DIRECTION: &str = "disk.io.direction";

type Pick<T> = fn(&TargetResources) -> Option<T>;

/// Attributes of a figure with more than one series per target.
type Series<T> = fn(&TargetResources) -> Vec<(T, Vec<KeyValue>)>;

pub fn register(meter: &Meter, snapshot: Shared<ResourceSnapshot>) {
    let u64_gauges: &[(&'static str, &'static str, &'static str, Pick<u64>)] = &[
        ("nodescope.filesystem.size", "By", "Size of the filesystem holding the data dir", |t| {
            t.filesystem.map(|f| f.size_bytes)
        }),
        (
            "nodescope.filesystem.free",
            "By",
            "Free bytes on the data dir's filesystem, including blocks reserved for root",
            |t| t.filesystem.map(|f| f.free_bytes),
        ),
        (
            "nodescope.filesystem.available",
            "By",
            "Bytes an unprivileged process (the node) can still use on the data dir's filesystem",
            |t| t.filesystem.map(|f| f.available_bytes),
        ),
        ("nodescope.filesystem.inodes", "{inode}", "Inodes of the data dir's filesystem", |t| {
            t.filesystem.map(|f| f.inodes_total)
        }),
        ("nodescope.filesystem.inodes.free", "{inode}", "Free inodes of the data dir's filesystem", |t| {
            t.filesystem.map(|f| f.inodes_free)
        }),
        ("nodescope.filesystem.inodes.available", "{inode}", "Inodes an unprivileged process can still use", |t| {
            t.filesystem.map(|f| f.inodes_available)
        }),
        ("nodescope.datadir.size", "By", "Apparent size of the data dir, as du -sb counts it", |t| {
            t.datadir_size_bytes
        }),
        (
            "nodescope.datadir.entries",
            "{entry}",
            "Files and directories of the data dir the size tracker remembers",
            |t| t.datadir_entries,
        ),
        (
            "nodescope.datadir.writable",
            "",
            "1 when a file could be created and written in the data dir as the node's user, else 0",
            |t| t.datadir_writable.map(u64::from),
        ),
        (
            "nodescope.cgroup.memory.usage",
            "By",
            "Memory charged to the node's cgroup (memory.current, v1 memory.usage_in_bytes)",
            |t| t.cgroup.as_ref()?.memory_usage_bytes,
        ),
        (
            "nodescope.cgroup.memory.working_set",
            "By",
            "Memory of the node's cgroup less inactive file pages (memory.stat inactive_file), as kubelet counts it",
            |t| t.cgroup.as_ref()?.memory_working_set_bytes,
        ),
        ("nodescope.cgroup.memory.limit", "By", "Memory limit of the node's cgroup; absent when unlimited", |t| {
            t.cgroup.as_ref()?.memory_limit_bytes
        }),
        (
            "nodescope.cgroup.memory.peak",
            "By",
            "Highest memory usage of the node's cgroup (memory.peak, v1 memory.max_usage_in_bytes)",
            |t| t.cgroup.as_ref()?.memory_peak_bytes,
        ),
        (
            "nodescope.cgroup.pids",
            "{task}",
            "Tasks (threads) in the node's cgroup and its children (pids.current)",
            |t| t.cgroup.as_ref()?.pids,
        ),
        ("nodescope.process.open_fds", "{fd}", "File descriptors the node process has open", |t| {
            t.process.as_ref().map(|p| p.open_fds)
        }),
        (
            "nodescope.process.fd_limit",
            "{fd}",
            "The node process's soft limit on open files; absent when unlimited",
            |t| t.process.as_ref()?.fd_limit,
        ),
        ("nodescope.process.rss", "By", "Resident memory of the node process", |t| {
            t.process.as_ref().map(|p| p.rss_bytes)
        }),
        ("nodescope.process.threads", "{thread}", "Threads of the node process", |t| {
            t.process.as_ref().map(|p| p.threads)
        }),
    ];
    for &(name, unit, description, pick) in u64_gauges {
        let s = snapshot.clone();
        let b = meter.u64_observable_gauge(name).with_description(description);
        let b = if unit.is_empty() { b } else { b.with_unit(unit) };
        b.with_callback(move |o| {
            for t in &s.get().targets {
                if let Some(v) = pick(t) {
                    o.observe(v, &[KeyValue::new(TARGET, t.name.clone())]);
                }
            }
        })
        .build();
    }

    let f64_gauges: &[(&'static str, &'static str, &'static str, Pick<f64>)] = &[
        ("nodescope.datadir.growth", "By/s", "How fast the data dir grew over resources.forecast_window (least-squares slope)", |t| {
            t.growth_bytes_per_second
        }),
        ("nodescope.filesystem.growth", "By/s", "How fast the used space of the data dir's filesystem grew over resources.forecast_window", |t| {
            t.filesystem_growth_bytes_per_second
        }),
        // No unit: the Prometheus exporter would append "_days" to a name that says it.
        ("nodescope.datadir.days_until_full", "", "Days until the data dir's filesystem is full at its growth over resources.forecast_window; absent when it is not filling", |t| {
            t.days_until_full
        }),
        ("nodescope.process.uptime", "s", "Seconds since the node process started", |t| t.process.as_ref().map(|p| p.uptime_seconds)),
    ];
    for &(name, unit, description, pick) in f64_gauges {
        let s = snapshot.clone();
        let b = meter.f64_observable_gauge(name).with_description(description);
        let b = if unit.is_empty() { b } else { b.with_unit(unit) };
        b.with_callback(move |o| {
            for t in &s.get().targets {
                if let Some(v) = pick(t) {
                    o.observe(v, &[KeyValue::new(TARGET, t.name.clone())]);
                }
            }
        })
        .build();
    }

    let f64_counters: &[(&'static str, &'static str, Pick<f64>)] = &[
        (
            "nodescope.cgroup.cpu.time",
            "CPU time used by the node's cgroup (cpu.stat usage_usec, v1 cpuacct.usage)",
            |t| t.cgroup.as_ref()?.cpu_usage_seconds,
        ),
        (
            "nodescope.cgroup.cpu.throttled",
            "Time the node's cgroup was held back by its CPU quota (throttled_usec, v1 throttled_time)",
            |t| t.cgroup.as_ref()?.cpu_throttled_seconds,
        ),
    ];
    for &(name, description, pick) in f64_counters {
        let s = snapshot.clone();
        meter
            .f64_observable_counter(name)
            .with_unit("s")
            .with_description(description)
            .with_callback(move |o| {
                for t in &s.get().targets {
                    if let Some(v) = pick(t) {
                        o.observe(v, &[KeyValue::new(TARGET, t.name.clone())]);
                    }
                }
            })
            .build();
    }

    let u64_counters: &[(&'static str, &'static str, &'static str, Series<u64>)] = &[
        ("nodescope.cgroup.cpu.throttled_periods", "{period}", "CPU quota periods in which the node's cgroup was throttled (nr_throttled)", |t| {
            t.cgroup.as_ref().and_then(|c| c.cpu_throttled_periods).map(|v| (v, vec![])).into_iter().collect()
        }),
        ("nodescope.cgroup.io", "By", "Bytes the node's cgroup read from and wrote to each block device (io.stat, v1 blkio.throttle.io_service_bytes_recursive)", |t| {
            io_series(t, |d| (d.read_bytes, d.write_bytes))
        }),
        ("nodescope.cgroup.io.operations", "{operation}", "Block I/O requests of the node's cgroup per device", |t| io_series(t, |d| (d.read_ops, d.write_ops))),
        ("nodescope.process.io", "By", "Bytes the node process made the storage layer fetch and send (/proc/PID/io read_bytes, write_bytes)", |t| {
            t.process
                .as_ref()
                .map(|p| vec![(p.read_bytes, vec![KeyValue::new(DISK_DIRECTION, "read")]), (p.write_bytes, vec![KeyValue::new(DISK_DIRECTION, "write")])])
                .unwrap_or_default()
        }),
        ("nodescope.process.restarts", "{restart}", "Times the target's process changed (new pid or start time) while the agent ran", |t| {
            t.process.as_ref().map(|p| vec![(p.restarts, vec![])]).unwrap_or_default()
        }),
        ("nodescope.datadir.scan.operations", "{operation}", "Filesystem operations the data dir size tracker spent (stat, opendir, 64 entries read)", |t| {
            t.datadir_entries.map(|_| vec![(t.datadir_scan_operations, vec![])]).unwrap_or_default()
        }),
    ];
    for &(name, unit, description, series) in u64_counters {
        let s = snapshot.clone();
        meter
            .u64_observable_counter(name)
            .with_unit(unit)
            .with_description(description)
            .with_callback(move |o| {
                for t in &s.get().targets {
                    for (v, mut attrs) in series(t) {
                        attrs.push(KeyValue::new(TARGET, t.name.clone()));
                        o.observe(v, &attrs);
                    }
                }
            })
            .build();
    }

    let s = snapshot;
    meter
        .u64_observable_counter("nodescope.datadir.passes_skipped")
        .with_description(
            "Data dir passes not run because the previous one had not finished (a slow or hung filesystem)",
        )
        .with_callback(move |o| o.observe(s.get().datadir_passes_skipped, &[]))
        .build();
}

fn io_series(t: &TargetResources, pick: fn(&super::IoDevice) -> (u64, u64)) -> Vec<(u64, Vec<KeyValue>)> {
    let Some(c) = &t.cgroup else { return Vec::new() };
    c.io.iter()
        .flat_map(|d| {
            let (read, write) = pick(d);
            [
                (read, vec![KeyValue::new(DEVICE, d.device.clone()), KeyValue::new(DISK_DIRECTION, "read")]),
                (write, vec![KeyValue::new(DEVICE, d.device.clone()), KeyValue::new(DISK_DIRECTION, "write")]),
            ]
        })
        .collect()
}

//! The /proc and cgroup file readers: mountinfo (and the cgroup mounts in
//! it), /proc/PID/cgroup, cgroup2 io.stat, v1 blkio (the text up to a NUL
//! as io_service_bytes, after it as io_serviced), cpu.stat and memory.stat
//! keys, and the procfs crate's parsers the process reader uses
//! (/proc/PID/status, io, /proc/uptime, /proc/stat). The same text goes to
//! each. Never panics. Not procfs-core 0.18's /proc/PID/limits parser (it
//! subtracts past zero on a line of fewer than three words) nor its
//! /proc/PID/stat one (it slices two bytes past the last ')', inside a
//! multi-byte character unless `) S` follows): the kernel writes both files
//! in a shape that never reaches those panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodescope::cgroup::{Mounts, ProcessCgroups};
use nodescope::resources::cgroup_stats::{flat_key, parse_blkio, parse_io_stat};
use procfs::{FromRead, FromReadSI};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = nodescope::mountinfo::parse(&text);
    let _ = Mounts::parse(&text);
    let _ = ProcessCgroups::parse(&text);
    let _ = parse_io_stat(&text);
    let (bytes, ops) = text.split_once('\0').unwrap_or((&text, ""));
    let _ = parse_blkio(bytes, ops);
    for key in
        ["usage_usec", "throttled_usec", "nr_throttled", "throttled_time", "inactive_file", "total_inactive_file"]
    {
        let _ = flat_key(&text, key);
    }

    let _ = procfs::process::Status::from_read(data);
    let _ = procfs::process::Io::from_read(data);
    let _ = procfs::Uptime::from_read(data);
    let _ = procfs::KernelStats::from_read(data, procfs::current_system_info());
});

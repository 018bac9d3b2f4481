//! The /proc and cgroup file readers: mountinfo (and the cgroup mounts in
//! it), /proc/PID/cgroup, cgroup2 io.stat, v1 blkio (the text up to a NUL
//! as io_service_bytes, after it as io_serviced), cpu.stat and memory.stat
//! keys. The same text goes to each. Never panics. The procfs crate's
//! parsers of the files only the kernel writes (/proc/PID/stat, status, io,
//! limits, /proc/uptime, /proc/stat) are left out: procfs-core 0.18's panic
//! on text the kernel never writes (limits subtracts past zero on a short
//! line; stat and io slice inside a multi-byte character).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodescope::cgroup::{Mounts, ProcessCgroups};
use nodescope::resources::cgroup_stats::{flat_key, parse_blkio, parse_io_stat};

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
});

//! A mountinfo file (proc(5)) through the procfs crate's parser, with the
//! kernel's octal escapes undone: procfs keeps `\040` (space), `\011`,
//! `\012` and `\134` as written, in mount points and option values alike.

use std::collections::HashMap;
use std::path::PathBuf;

use procfs::process::MountInfo;

pub struct Mount {
    pub mount_point: PathBuf,
    pub fs_type: String,
    /// Superblock options (`upperdir=...` of an overlay, the controllers of
    /// a cgroup v1 hierarchy), values unescaped.
    pub super_options: HashMap<String, Option<String>>,
}

/// Every line procfs can parse, in file order; others are skipped.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| MountInfo::from_line(line).ok())
        .map(|m| Mount {
            mount_point: PathBuf::from(unescape(&m.mount_point.to_string_lossy())),
            fs_type: m.fs_type,
            super_options: m.super_options.into_iter().map(|(k, v)| (k, v.map(|v| unescape(&v)))).collect(),
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        // an escape is one byte, \000 to \377: past that it is kept as written
        let octal = |j: usize, top: u8| b.get(j).is_some_and(|c| (b'0'..=top).contains(c));
        if b[i] == b'\\' && octal(i + 1, b'3') && octal(i + 2, b'7') && octal(i + 3, b'7') {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_overlay_options() {
        let m = parse(
            "41 1 0:34 / /mnt/a\\040b rw - cgroup2 none rw\n\
             50 40 0:60 / / rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/var/lib/c\\040d/diff,workdir=/w\n\
             not a mountinfo line\n",
        );
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/a b"));
        assert_eq!(m[0].fs_type, "cgroup2");
        assert_eq!(m[1].super_options["upperdir"].as_deref(), Some("/var/lib/c d/diff"));
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
        // \400 and up are no byte: their value overflowed (a panic in a debug build)
        assert_eq!(unescape("\\400\\777x\\37"), "\\400\\777x\\37");
    }
}

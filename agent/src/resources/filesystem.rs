//! Size, free space and inodes of the filesystem holding a data dir, from
//! statvfs(3): the same call `df` makes, so the figures match it.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::FsStats;

/// statvfs of the filesystem `path` is on. Sizes are in bytes (block counts
/// times the fragment size, as df multiplies them).
pub fn statvfs(path: &Path) -> io::Result<FsStats> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: zeroed is a valid bit pattern for the plain C struct statvfs.
    let mut raw: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid NUL-terminated string and raw a valid out pointer.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut raw) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Some filesystems leave f_frsize 0 and mean f_bsize.
    let unit = if raw.f_frsize > 0 { raw.f_frsize } else { raw.f_bsize } as u64;
    Ok(FsStats {
        size_bytes: raw.f_blocks as u64 * unit,
        free_bytes: raw.f_bfree as u64 * unit,
        available_bytes: raw.f_bavail as u64 * unit,
        inodes_total: raw.f_files as u64,
        inodes_free: raw.f_ffree as u64,
        inodes_available: raw.f_favail as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_filesystem_is_consistent() {
        let fs = statvfs(Path::new("/")).unwrap();
        assert!(fs.size_bytes > 0);
        assert!(fs.free_bytes <= fs.size_bytes);
        assert!(fs.available_bytes <= fs.free_bytes);
        assert!(fs.inodes_free <= fs.inodes_total);
    }

    #[test]
    fn missing_path_is_an_error() {
        let e = statvfs(Path::new("/nonexistent/nodescope/dir")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
